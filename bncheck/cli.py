"""The ``bncheck`` command: a thin layer over the library.

Commands parse options, call the library, render the result and map exceptions
to exit codes: 0 pass, 1 discrepancy found, 2 usage or input error. Heavy
imports (torch) happen inside the commands so that ``--help`` stays instant.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path

import click

from . import __version__
from .arguments import SEED_MAX, SEED_MIN
from .render import OutputFormat, RenderOptions

EXIT_PASS, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
# As shells report a death by signal (128 + number); click's default 1 would read as "discrepancy found".
EXIT_INTERRUPTED = 130  # SIGINT, Ctrl-C
EXIT_TERMINATED = 143   # SIGTERM: timeout, CI cancellation, docker stop


class InputProblem(click.ClickException):
    exit_code = EXIT_ERROR


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, so that every finally (restored model, removed temporary
    file) runs before the exit."""


def _one_line(text: str) -> str:
    """Messages of torch and user code can span lines; stderr gets exactly one."""
    return " ".join(text.split())


@contextlib.contextmanager
def _sigterm_unwinds():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. a test runner's worker)
        return

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail_on_errors(command):
    """Turn library exceptions into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .errors import BncheckError

        from .setup_gc import SETUP_GC

        try:
            with _sigterm_unwinds(), SETUP_GC.paused():
                return command(*args, **kwargs)
        except BncheckError as error:
            raise InputProblem(_one_line(str(error))) from error
        except KeyboardInterrupt:
            click.echo("Aborted!", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except Terminated:
            click.echo("Terminated.", err=True)
            raise click.exceptions.Exit(EXIT_TERMINATED) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if os.environ.get("BNCHECK_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
                import traceback

                traceback.print_exc()  # then exit 2 all the same: 1 would read as "discrepancy found"
            raise InputProblem(_one_line(f"internal error: {type(error).__name__}: {error} "
                                         "(set BNCHECK_DEBUG=1 for the traceback)")) from error

    return wrapper


class OneLineErrorGroup(click.Group):
    """click prints a usage error as four lines (usage, hint, blank, error); bncheck prints one,
    with exit code 2, like every other error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()  # `bncheck` alone: the help, as click shows it
            sys.exit(EXIT_ERROR)
        except click.UsageError as error:
            message = error.format_message().rstrip()
            message += "" if message.endswith((".", "?", "!", ")")) else "."
            where = f" See '{error.ctx.command_path} --help'." if error.ctx is not None else ""
            click.echo(_one_line(f"Error: {message}{where}"), err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as error:
            click.echo(_one_line(f"Error: {error.format_message()}"), err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


def _check_device(ctx, param, value):
    from .devices import validate_device_text
    from .errors import InputError

    try:
        return validate_device_text(value)
    except InputError as error:
        raise click.BadParameter(str(error)) from error


def _check_not_nan(ctx, param, value):
    if value is not None and value != value:
        raise click.BadParameter("nan is not a number; pass a fraction such as 0.05")
    return value


def model_options(command):
    """MODEL argument and how to build it."""
    for decorator in reversed([
        click.argument("model_spec", metavar="MODEL"),
        click.option("--checkpoint", type=click.Path(dir_okay=False), help="State dict (or Lightning/DDP/compile "
                     "checkpoint, or .safetensors) to load on top of the model."),
        click.option("--unsafe-pickle", is_flag=True, help="Allow checkpoints that hold pickled Python objects "
                     "(a full model). Unpickling runs code from the file: only for files you trust."),
        click.option("--num-classes", type=click.IntRange(min=1), help="Classes for torchvision:/timm: models."),
    ]):
        command = decorator(command)
    return command


def data_options(command):
    for decorator in reversed([
        click.option("--data", "data_path", type=click.Path(), help="Image folder, .pt/.pth, .npz or .npy "
                     "to use instead of model.py's data."),
        click.option("--image-size", type=click.IntRange(min=1), help="Resize images in an image folder."),
        click.option("--normalize", default="auto", show_default=True,
                     help="auto (imagenet for image folders, none for tensor files), imagenet, none or MEAN,STD."),
        click.option("--layout", type=click.Choice(["auto", "NCHW", "NHWC"]), default="auto", show_default=True,
                     help="Layout of 4-D arrays in --data."),
        click.option("--input-key", help="Key of the inputs when batches or files are dicts."),
        click.option("--target-key", help="Key of the targets when batches or files are dicts."),
        click.option("--device", default="auto", show_default=True, envvar="BNCHECK_DEVICE",
                     callback=_check_device, help="auto, cpu, cuda or cuda:N."),
        click.option("--batch-size", type=click.IntRange(min=2), help="Batch size (default: the loader's)."),
        click.option("--seed", type=click.IntRange(SEED_MIN, SEED_MAX), default=0, show_default=True,
                     envvar="BNCHECK_SEED", help="Seed of the batch shuffle."),
        click.option("--max-batches", type=click.IntRange(min=1), envvar="BNCHECK_MAX_BATCHES",
                     help="Use at most N batches (a seeded uniform subset)."),
        click.option("--quiet", "-q", is_flag=True, envvar="BNCHECK_QUIET", help="No progress bar."),
    ]):
        command = decorator(command)
    return command


def force_option(command):
    return click.option("--force", is_flag=True,
                        help="Overwrite the -o file if it exists (never one of the command's inputs).")(command)


def output_options(command):
    for decorator in reversed([
        click.option("--format", "fmt", type=click.Choice([f.value for f in OutputFormat]), default="terminal",
                     show_default=True, envvar="BNCHECK_FORMAT", help="Report format (stdout or -o)."),
        click.option("--all-layers", is_flag=True, help="Show every norm layer, not only the top ones."),
        click.option("--top", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Norm layers shown by default."),
    ]):
        command = decorator(command)
    return command


def _render_options(all_layers, top, per_channel=False, to_file=False) -> RenderOptions:
    import shutil

    tty = not to_file and sys.stdout.isatty()
    # A pipe or a file has no width: COLUMNS when set, else 120.
    width = shutil.get_terminal_size((120, 40)).columns if tty else _columns_from_environment(120)
    return RenderOptions(all_layers=all_layers, top=top, per_channel=per_channel, color=tty, width=width)


def _columns_from_environment(default: int) -> int:
    value = os.environ.get("COLUMNS", "")
    return int(value) if value.isdigit() and 40 <= int(value) <= 1000 else default


def _emit(text: str, target) -> None:
    """Report to stdout, or to a file written only once complete."""
    if target is None:
        click.echo(text, nl=False)
        return
    from .files import write_output

    write_output(target, lambda temp: Path(temp).write_bytes(text.encode()))


def _output_target(path: str | None, force: bool, model_spec: str, *, option: str = "-o", **inputs: str | None):
    """The checked output file of a command (``option`` names it in messages): never one of its inputs
    (MODEL, and each keyword, e.g. ``checkpoint=`` for --checkpoint; another output of the same command
    too), never an existing file without --force. Checked before any work is done."""
    if path is None:
        return None
    from .files import OutputTarget, check_output
    from .loading.model_sources import is_named_model_spec
    from .loading.user_module import split_spec

    named = [] if is_named_model_spec(model_spec) else [("MODEL", split_spec(model_spec)[0])]
    named += [(f"--{option.replace('_', '-')}", Path(value)) for option, value in inputs.items() if value]
    target = OutputTarget(Path(path), inputs=tuple(named), force=force, option=option)
    check_output(target)
    return target


def _user_code_prints_to_stderr():
    """model.py may print while it trains: keep stdout for the report alone."""
    return contextlib.redirect_stdout(sys.stderr)


def _check_checkpoint_suffix(target: Path, framework: str) -> None:
    name = target.name.lower()
    if framework == "keras" and not name.endswith((".keras", ".weights.h5")):
        raise InputProblem(f"-o {target}: a Keras model is written as a .keras file (or .weights.h5)")
    if framework == "torch" and name.endswith((".keras", ".h5", ".hdf5")):
        raise InputProblem(f"-o {target}: a PyTorch model is written as a state_dict (.pt or .safetensors)")


class _Progress:
    """A rich progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, quiet: bool, description: str):
        self.enabled = not quiet and sys.stderr.isatty()
        self.description = description
        self._progress = self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._progress = Progress(console=Console(stderr=True), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=None)
        return self

    def __call__(self, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def run_options(command):
    """How the forwards run: precision, memory format, processes."""
    for decorator in reversed([
        click.option("--amp", type=click.Choice(["bf16", "fp16"]), help="Run the forwards under autocast; the "
                     "statistics stay exact (float64 moments of what the layers see)."),
        click.option("--channels-last", is_flag=True, help="Run 4-D models and inputs in channels-last memory "
                     "format (restored afterwards)."),
        click.option("--dist-timeout", type=click.FloatRange(min=1), default=1800.0, show_default=True,
                     envvar="BNCHECK_DIST_TIMEOUT", help="Seconds a process waits for the others under torchrun."),
    ]):
        command = decorator(command)
    return command


def _run_keywords(params: dict) -> dict:
    """The library's run keywords, from a command's parsed options."""
    names = ("device", "batch_size", "seed", "max_batches", "amp", "channels_last", "input_key", "target_key",
             "output_index", "output_key")
    keywords = {name: params[name] for name in names if name in params}
    keywords["dist_timeout"] = params.get("dist_timeout", 1800.0)
    return keywords


@contextlib.contextmanager
def _processes(device: str, timeout: float):
    """Under torchrun, join the process group (nccl for CUDA, gloo otherwise) and fail together."""
    from .distributed import World, current_world, init_from_env, launched_by_torchrun, shutdown

    if not launched_by_torchrun():
        yield World()
        return
    import torch

    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    created = init_from_env(use_cuda, timeout)
    try:
        world = current_world(timeout)
        with world.failing_together():
            yield world
            world.exchange(None)  # a failure to write on rank 0 stops every rank
    finally:
        shutdown(created)


def _load(model_spec, *, need_data, checkpoint, unsafe_pickle, num_classes, data_path=None, image_size=None,
          normalize="auto", layout="auto", input_key=None, target_key=None):
    from .loading.sources import DataOptions, load_inputs  # imports torch
    from .setup_gc import SETUP_GC

    SETUP_GC.settle(collect=True)  # before the user's code runs, which may make garbage worth collecting
    loaded = load_inputs(model_spec, need_data=need_data, checkpoint=checkpoint, unsafe_pickle=unsafe_pickle,
                         num_classes=num_classes,
                         data=DataOptions(data_path, image_size, normalize, layout, input_key, target_key))
    SETUP_GC.settle()
    return loaded


@click.group(cls=OneLineErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bncheck")
def main():
    """Find, explain and fix BatchNorm train/eval discrepancies.

    MODEL is a model.py (defining build_model() and get_dataloader()), optionally
    path.py:factory; torchvision:NAME or timm:NAME with --checkpoint and --data;
    or a .keras file.

    Exit codes: 0 pass, 1 discrepancy found, 2 usage or input error.
    """


@main.command()
@model_options
@data_options
@output_options
@run_options
@click.option("--max-samples", type=click.IntRange(min=2), help="Use at most N samples (seeded uniform subset).")
@click.option("--max-gap", type=click.FloatRange(min=0, max=1), envvar="BNCHECK_MAX_GAP", callback=_check_not_nan,
              help="Largest train-minus-eval accuracy gap that passes, as a fraction [default: 0.05]; "
                   "for tasks without accuracy, the relative loss gap [default: 0.10].")
@click.option("--quick", is_flag=True, envvar="BNCHECK_QUICK",
              help="Stop as soon as the gap's interval lies wholly above or below --max-gap.")
@click.option("--dropout-batches", type=click.IntRange(min=0), default=1, show_default=True,
              help="Batches model.train() with dropout on runs on (for the dropout note); 0 skips it.")
@click.option("--output-index", type=int, help="Which element of a tuple output holds the predictions.")
@click.option("--output-key", help="Which key or attribute of the output holds the predictions.")
@click.option("--per-channel", is_flag=True, help="JSON: add per-channel true and running statistics.")
@click.option("--attribute", is_flag=True, help="Measure how much of the gap each top layer's statistics cost.")
@click.option("--attribute-top", type=click.IntRange(min=1), default=3, show_default=True,
              help="Layers to attribute (most drifted first).")
@click.option("--attribute-batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batches the attribution runs on; it costs (top + 4) forwards over each.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False),
              help="Write the report to FILE (only once complete) instead of stdout.")
@force_option
@_fail_on_errors
def diagnose(**params):
    """Compare eval-mode and train-mode BatchNorm on the data and explain the gap.

    Example: bncheck diagnose examples/resnet_three_images/model.py

    Under torchrun (torchrun --nproc-per-node=N -m bncheck diagnose ...) every process takes a
    shard of the data and rank 0 prints the report.
    """
    from .devices import resolve_device
    from .diagnosis import diagnose as run_diagnosis
    from .render import renderer_for

    target = _output_target(params["output_path"], params["force"], params["model_spec"],
                            checkpoint=params["checkpoint"], data=params["data_path"])
    resolve_device(params["device"])  # fail before the model is built and trained
    with _processes(params["device"], params["dist_timeout"]) as world:
        with _user_code_prints_to_stderr(), _Progress(params["quiet"] or not world.is_main, "diagnosing") as progress:
            loaded = _load_for(params, need_data=True)
            report = run_diagnosis(
                loaded.model, loaded.data, max_gap=params["max_gap"], quick=params["quick"],
                max_samples=params["max_samples"], loss_fn=loaded.loss_fn, attribute=params["attribute"],
                attribute_top=params["attribute_top"], attribute_batches=params["attribute_batches"],
                dropout_batches=params["dropout_batches"], missing_running_stats=loaded.missing_running_stats,
                missing_update_counts=loaded.missing_update_counts, averaging_hints=loaded.averaging_hints,
                notes=loaded.notes, progress=progress, world=world, **_run_keywords(params))
        if world.is_main:
            options = _render_options(params["all_layers"], params["top"], params["per_channel"], target is not None)
            _emit(renderer_for(OutputFormat(params["fmt"]))(options).diagnosis(report), target)
    sys.exit(EXIT_PASS if report.passed else EXIT_FAIL)


@main.command()
@model_options
@output_options
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False),
              help="Write the report to FILE instead of stdout.")
@force_option
@_fail_on_errors
def inspect(model_spec, checkpoint, unsafe_pickle, num_classes, fmt, all_layers, top, output_path, force):
    """Check norm layers without data: init-valued stats, momentum, frozen layers, reuse.

    Example: bncheck inspect model.py --checkpoint last.ckpt
    """
    from .inspection import inspect as run_inspection
    from .render import renderer_for

    target = _output_target(output_path, force, model_spec, checkpoint=checkpoint)
    with _user_code_prints_to_stderr():
        loaded = _load(model_spec, need_data=False, checkpoint=checkpoint, unsafe_pickle=unsafe_pickle,
                       num_classes=num_classes)
        report = run_inspection(loaded.model, missing_running_stats=loaded.missing_running_stats,
                                missing_update_counts=loaded.missing_update_counts, notes=loaded.notes)
    renderer = renderer_for(OutputFormat(fmt))(_render_options(all_layers, top, False, target is not None))
    _emit(renderer.inspection(report), target)
    sys.exit(EXIT_PASS if report.passed else EXIT_FAIL)


@main.command()
@model_options
@data_options
@run_options
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="New checkpoint: a state_dict (.pt), or a .keras file for Keras models.")
@force_option
@click.option("--num-samples", type=click.IntRange(min=2), help="Recompute from at most N samples.")
@click.option("--include-frozen", is_flag=True, help="Also recompute the layers that use their running statistics "
              "under model.train() (kept in eval by an overridden train(), FrozenBatchNorm).")
@click.option("--layers", "layer_patterns", help="Recompute exactly the norm layers matching these comma-separated "
              "glob patterns of layer names (e.g. 'backbone.*').")
@click.option("--no-eval", is_flag=True, help="Only the statistics pass: no eval metrics before and after.")
@click.option("--val-data", type=click.Path(), help="Also report eval metrics before/after on this data.")
@click.option("--output-index", type=int, help="Which element of a tuple output holds the predictions.")
@click.option("--output-key", help="Which key or attribute of the output holds the predictions.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in OutputFormat]), default="terminal",
              show_default=True, envvar="BNCHECK_FORMAT", help="Summary format (stdout or --report).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the summary in --format to FILE (only once complete) instead of stdout.")
@_fail_on_errors
def recalibrate(**params):
    """Recompute exact running statistics from data and write a new checkpoint.

    By default exactly the norm layers that normalise with batch statistics under
    model.train() are recomputed; the others keep the statistics training used.

    Example: bncheck recalibrate model.py -o fixed.pt
    """
    from .devices import resolve_device
    from .render import renderer_for

    inputs = dict(checkpoint=params["checkpoint"], data=params["data_path"], val_data=params["val_data"])
    target = _output_target(params["output_path"], params["force"], params["model_spec"], **inputs)
    report = _output_target(params["report_path"], params["force"], params["model_spec"], option="--report",
                            output=params["output_path"], **inputs)
    resolve_device(params["device"])  # fail before the model is built and trained
    with _processes(params["device"], params["dist_timeout"]) as world:
        with _user_code_prints_to_stderr(), _Progress(params["quiet"] or not world.is_main, "recalibrating") \
                as progress:
            loaded = _load_for(params, need_data=True)
            _check_checkpoint_suffix(target.path, loaded.framework)
            saved = _recalibrate_and_save(loaded, params, target, world, progress)
        if world.is_main:
            options = RenderOptions(color=report is None and sys.stdout.isatty())
            _emit(renderer_for(OutputFormat(params["fmt"]))(options).recalibration(saved), report)


def _recalibrate_and_save(loaded, params: dict, target, world, progress):
    from .files import write_output
    from .frameworks import adapter_for
    from .recalibration import recalibrate as run_recalibration

    validation = None
    if params["val_data"] is not None and not params["no_eval"]:
        from .loading.data_sources import load_data_path

        validation = load_data_path(params["val_data"], image_size=params["image_size"],
                                    normalize=params["normalize"], layout=params["layout"],
                                    input_key=params["input_key"], target_key=params["target_key"],
                                    channels_last=loaded.framework == "keras")
    result, fixed_model = run_recalibration(
        loaded.model, loaded.data, inplace=True, num_samples=params["num_samples"],
        include_frozen=params["include_frozen"], layers=params["layer_patterns"], evaluate=not params["no_eval"],
        val_data=validation, loss_fn=loaded.loss_fn, progress=progress, return_model=True, world=world,
        **_run_keywords(params))
    if not world.is_main:
        return result
    write_output(target, adapter_for(fixed_model).save)
    return dataclasses.replace(result, output_path=str(target.path))


def _load_for(params: dict, *, need_data: bool):
    return _load(params["model_spec"], need_data=need_data, checkpoint=params["checkpoint"],
                 unsafe_pickle=params["unsafe_pickle"], num_classes=params["num_classes"],
                 data_path=params.get("data_path"), image_size=params.get("image_size"),
                 normalize=params.get("normalize", "auto"), layout=params.get("layout", "auto"),
                 input_key=params.get("input_key"), target_key=params.get("target_key"))


def run() -> None:
    """The ``bncheck`` console command: the CLI as the whole process."""
    from .setup_gc import SETUP_GC

    SETUP_GC.process_ends_after = True
    main()


if __name__ == "__main__":
    run()
