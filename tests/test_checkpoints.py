"""Reading checkpoints in the shapes training code writes them, and loading them safely."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bncheck.errors import CheckpointError
from bncheck.loading.checkpoints import (
    CheckpointLoad,
    add_prefix,
    choose_added_prefix,
    choose_prefix,
    extract_state_dict,
    load_checkpoint_into,
    match_state_dict,
    read_checkpoint,
    read_full_model,
    strip_prefix,
)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def trained_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with distinctive values, including non-default BN statistics."""
    torch.manual_seed(seed)
    net = TinyNet()
    net.bn.running_mean.add_(3.0)
    net.bn.running_var.mul_(2.0)
    net.bn.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_plain_state_dict_loads_exactly(tmp_path):
    state = trained_state()
    torch.save(state, tmp_path / "plain.pt")
    model = TinyNet()
    result = load_checkpoint_into(model, tmp_path / "plain.pt")
    assert result == CheckpointLoad(str(tmp_path / "plain.pt"), (), (), (), "")
    assert_loaded(model, state)


def test_lightning_checkpoint_with_model_prefix(tmp_path):
    state = trained_state()
    lightning = {
        "epoch": 4,
        "global_step": 100,
        "state_dict": {f"model.{k}": v for k, v in state.items()},
        "optimizer_states": [],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    model = TinyNet()
    result = load_checkpoint_into(model, tmp_path / "last.ckpt")
    assert result.stripped_prefix == "model."
    assert result.missing == () and result.unexpected == ()
    assert_loaded(model, state)


def test_ddp_module_prefix_under_model_state_dict(tmp_path):
    state = trained_state()
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, tmp_path / "ddp.pt")
    model = TinyNet()
    assert load_checkpoint_into(model, tmp_path / "ddp.pt").stripped_prefix == "module."
    assert_loaded(model, state)


def test_torch_compile_prefix_from_a_real_compiled_module(tmp_path):
    state = trained_state()
    net = TinyNet()
    net.load_state_dict(state)
    compiled_state = torch.compile(net).state_dict()  # compiling is lazy, so this is instant
    assert all(k.startswith("_orig_mod.") for k in compiled_state)
    torch.save({"model": compiled_state}, tmp_path / "compiled.pt")
    model = TinyNet()
    assert load_checkpoint_into(model, tmp_path / "compiled.pt").stripped_prefix == "_orig_mod."
    assert_loaded(model, state)


@pytest.mark.parametrize("prefix", ["module.module.", "model._orig_mod.", "module._orig_mod.", "net."])
def test_combined_prefixes_are_stripped_together(prefix):
    state = trained_state()
    wrapped = {f"{prefix}{k}": v for k, v in state.items()}
    model = TinyNet()
    assert choose_prefix(wrapped, model.state_dict()) == prefix
    assert match_state_dict(wrapped, model).keys() == state.keys()


def test_prefix_that_is_a_real_submodule_name_is_kept():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = TinyNet()

    model = Wrapper()
    state = model.state_dict()
    assert choose_prefix(state, state) == ""
    assert match_state_dict(state, model).keys() == state.keys()


def test_strip_prefix_leaves_other_keys_alone():
    a, b = torch.zeros(1), torch.ones(1)
    assert strip_prefix({"model.fc.weight": a, "criterion.weight": b}, "model.") == {"fc.weight": a, "criterion.weight": b}


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    state = trained_state()
    save_file(state, str(tmp_path / "weights.safetensors"))
    assert read_checkpoint(tmp_path / "weights.safetensors").keys() == state.keys()
    model = TinyNet()
    load_checkpoint_into(model, tmp_path / "weights.safetensors")
    assert_loaded(model, state)


def test_missing_running_stats_are_reported_not_raised(tmp_path):
    state = trained_state()
    stripped = {k: v for k, v in state.items() if not k.startswith("bn.running") and k != "bn.num_batches_tracked"}
    torch.save(stripped, tmp_path / "no_stats.pt")
    model = TinyNet()
    result = load_checkpoint_into(model, tmp_path / "no_stats.pt")
    expected = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    assert sorted(result.missing_running_stats) == sorted(expected)
    assert sorted(result.missing) == sorted(expected)
    assert torch.equal(model.bn.running_mean, torch.zeros(4))  # fresh buffers left in place
    assert torch.equal(model.conv.weight, state["conv.weight"])


def test_unexpected_keys_are_reported(tmp_path):
    state = {**trained_state(), "extra_head.weight": torch.ones(2)}
    torch.save(state, tmp_path / "extra.pt")
    result = load_checkpoint_into(TinyNet(), tmp_path / "extra.pt")
    assert result.unexpected == ("extra_head.weight",)
    assert result.missing == ()


def test_shape_mismatch_names_key_and_both_shapes_and_leaves_model_untouched(tmp_path):
    torch.save(TinyNet(classes=10).state_dict(), tmp_path / "ten.pt")
    model = TinyNet(classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(model, tmp_path / "ten.pt")
    assert str(info.value) == (
        f"checkpoint {tmp_path / 'ten.pt'}: shape mismatch at fc.weight: checkpoint (10, 4), model (3, 4); "
        "build the model with the shapes it was trained with (e.g. the number of classes)"
    )
    assert_loaded(model, before)


def test_nothing_matching_is_an_error(tmp_path):
    torch.save({"encoder.weight": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_into(TinyNet(), tmp_path / "other.pt")
    assert str(info.value) == (
        f"checkpoint {tmp_path / 'other.pt'}: none of its 1 keys match the model "
        "(checkpoint has encoder.weight, model has conv.weight); pass a checkpoint saved from this architecture"
    )


def test_pickled_full_model_is_refused_without_unsafe_pickle(tmp_path):
    torch.save(TinyNet(), tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "full.pt")
    # The pickled class is named by its import path, which depends on pytest's import mode.
    assert re.fullmatch(
        rf"checkpoint {re.escape(str(tmp_path / 'full.pt'))} holds pickled Python objects \(\S*TinyNet\), "
        r"not just tensors; pass --unsafe-pickle only if you trust the file, because unpickling runs code from it",
        str(info.value),
    )
    with pytest.raises(CheckpointError, match="--unsafe-pickle"):
        load_checkpoint_into(TinyNet(), tmp_path / "full.pt")


def test_pickled_full_model_loads_with_unsafe_pickle(tmp_path):
    original = TinyNet()
    original.load_state_dict(trained_state(seed=3))
    torch.save(original, tmp_path / "full.pt")
    model = read_full_model(tmp_path / "full.pt")
    assert isinstance(model, TinyNet)
    assert_loaded(model, original.state_dict())
    target = TinyNet()
    load_checkpoint_into(target, tmp_path / "full.pt", unsafe_pickle=True)
    assert_loaded(target, original.state_dict())


def test_read_full_model_on_weights_only_file_explains(tmp_path):
    torch.save(trained_state(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="holds weights only, not a pickled model"):
        read_full_model(tmp_path / "weights.pt")


def test_extract_state_dict_from_module_and_nested_module():
    net = TinyNet()
    assert extract_state_dict(net).keys() == net.state_dict().keys()
    assert extract_state_dict({"model": net, "epoch": 3}).keys() == net.state_dict().keys()


def test_dict_without_weights_lists_its_keys():
    with pytest.raises(CheckpointError) as info:
        extract_state_dict({"epoch": 3, "optimizer": {}}, source="checkpoint c.pt")
    assert str(info.value) == (
        "checkpoint c.pt: no state_dict found (top-level keys: epoch, optimizer); "
        "expected tensors at the top level or under one of: state_dict, model_state_dict, model, net, network"
    )


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "nope.pt")
    assert str(info.value) == f"checkpoint not found: {tmp_path / 'nope.pt'}"


def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "junk.pt")
    # The reason in brackets is torch's own wording, which varies between versions.
    assert re.fullmatch(
        rf"checkpoint {re.escape(str(tmp_path / 'junk.pt'))} cannot be read \(.+\); "
        r"pass a file written by torch.save or safetensors",
        str(info.value),
    )
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_lazy_modules_take_the_checkpoint_shapes(tmp_path):
    source = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    source[1].running_mean.fill_(2.0)
    torch.save(source.state_dict(), tmp_path / "lazy.pt")
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyBatchNorm1d())
    result = load_checkpoint_into(model, tmp_path / "lazy.pt")
    assert result.missing == () and result.unexpected == ()
    assert model[0].weight.shape == (4, 3)
    assert torch.equal(model[1].running_mean, torch.full((4,), 2.0))


# --------------------------------------------------------------------------- wrappers on the model's side


def test_plain_state_dict_into_a_data_parallel_model_gets_the_module_prefix(tmp_path):
    state = trained_state()
    torch.save(state, tmp_path / "plain.pt")
    model = nn.DataParallel(TinyNet())
    result = load_checkpoint_into(model, tmp_path / "plain.pt")
    assert result.added_prefix == "module." and result.stripped_prefix == "" and result.missing == ()
    assert_loaded(model.module, state)
    # and the other way, as before: a DataParallel checkpoint into the plain model
    torch.save(model.state_dict(), tmp_path / "dp.pt")
    plain = TinyNet()
    result = load_checkpoint_into(plain, tmp_path / "dp.pt")
    assert result.stripped_prefix == "module." and result.added_prefix == ""
    assert_loaded(plain, state)


def test_a_prefix_is_added_only_when_it_makes_keys_match():
    state = trained_state()
    model = TinyNet()
    assert choose_added_prefix(state, model.state_dict()) == ""
    assert match_state_dict(state, nn.DataParallel(TinyNet())).keys() == nn.DataParallel(TinyNet()).state_dict().keys()


# --------------------------------------------------------------------------- module versions (_metadata)


class Versioned(nn.Module):
    """Like torchvision's MNASNet: its loader reads its version from the state_dict's metadata."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_metadata_survives_extracting_stripping_and_adding_prefixes():
    state = nn.DataParallel(Versioned()).state_dict()
    assert state._metadata["module"]["version"] == 2
    for wrapped in (state, {"state_dict": state}):
        extracted = extract_state_dict(wrapped)
        assert extracted._metadata["module"]["version"] == 2
    stripped = strip_prefix(state, "module.")
    assert stripped._metadata[""]["version"] == 2 and "module" not in stripped._metadata
    added = add_prefix(stripped, "model.")
    assert added._metadata["model"]["version"] == 2 and set(added) == {"model.layer.weight", "model.layer.bias"}


@pytest.mark.parametrize("how", ["ddp", "copied", "safetensors"])
def test_modules_that_need_their_version_load(tmp_path, how):
    source = nn.DataParallel(Versioned()) if how == "ddp" else Versioned()
    with torch.no_grad():
        source.state_dict()[next(iter(source.state_dict()))].fill_(0.5)
    path = tmp_path / ("v.safetensors" if how == "safetensors" else "v.pt")
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))  # safetensors keeps no module versions
    elif how == "copied":
        torch.save({k: v for k, v in source.state_dict().items()}, path)  # a dict copy drops _metadata
    else:
        torch.save(source.state_dict(), path)
    model = Versioned()
    load_checkpoint_into(model, path)
    assert torch.equal(model.layer.weight, torch.full((2, 2), 0.5))


# --------------------------------------------------------------------------- averaged weights


def test_ema_and_averaged_model_checkpoints_say_so(tmp_path):
    from torch.optim.swa_utils import AveragedModel

    state = trained_state()
    torch.save({"model_ema": state, "epoch": 2}, tmp_path / "ema.pt")
    result = load_checkpoint_into(TinyNet(), tmp_path / "ema.pt")
    assert result.state_key == "model_ema" and "'model_ema', an EMA copy" in result.averaging_hints[0]
    averaged = AveragedModel(TinyNet())
    averaged.update_parameters(TinyNet())
    torch.save(averaged.state_dict(), tmp_path / "swa.pt")
    result = load_checkpoint_into(TinyNet(), tmp_path / "swa.pt")
    assert result.stripped_prefix == "module." and result.unexpected == ("n_averaged",)
    assert result.averaging_hints == ("the checkpoint is an AveragedModel's state with n_averaged=1",)
    # the regular weights beside an EMA copy: loaded, and the EMA copy named
    torch.save({"state_dict": state, "state_dict_ema": state}, tmp_path / "both.pt")
    result = load_checkpoint_into(TinyNet(), tmp_path / "both.pt")
    assert result.state_key == "state_dict" and result.ema_keys_not_loaded == ("state_dict_ema",)
    assert result.averaging_hints == ()
