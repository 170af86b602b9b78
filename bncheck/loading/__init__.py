"""Getting the user's model, weights and data from what they have on disk."""
