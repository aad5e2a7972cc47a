"""``fedrec simulate``: the whole federation on this machine, with a live progress display."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fedrec.options import (
    NON_EMPTY_PATH,
    DataDirOpt,
    DatasetOpt,
    FormatOpt,
    JsonAliasOpt,
    RunConfigOpt,
    SeedOpt,
    colored,
    config_flag_names,
    explicit_options,
    kebab_run_config,
    print_table,
    with_config_flags,
)
from shared.config import from_flat
from simulation.config import SimulationConfig
from simulation.config_help import SETTINGS_HELP

if TYPE_CHECKING:
    from simulation.pipeline import RunInterrupted

FLAGS = {
    "dataset": "dataset",
    "data_dir": "data-dir",
    "seed": "seed",
    "rounds": "rounds",
    "cohort_size": "cohort-size",
    "secagg": "secagg",
    "dp": "dp",
    "noise_multiplier": "noise-multiplier",
    "backend": "backend",
    "num_gpus_per_client": "num-gpus-per-client",
    "ray_address": "ray-address",
    "run_dir": "run-dir",
    "name": "name",
}

SETTING_FLAGS = config_flag_names(SETTINGS_HELP, skip=FLAGS)
"""The flags of every other :class:`SimulationConfig` setting."""


@with_config_flags(SimulationConfig, SETTINGS_HELP, skip=FLAGS)
def simulate(
    ctx: typer.Context,
    dataset: DatasetOpt = "synthetic",
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 42,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = SimulationConfig.rounds,
    cohort_size: Annotated[
        int, typer.Option(help="Clients sampled per round.")
    ] = SimulationConfig.cohort_size,
    secagg: Annotated[
        bool, typer.Option("--secagg/--no-secagg", help="Secure aggregation (SecAgg+).")
    ] = SimulationConfig.secagg,
    dp: Annotated[
        bool, typer.Option("--dp/--no-dp", help="Record-level DP-SGD (Opacus) on clients.")
    ] = SimulationConfig.dp,
    noise_multiplier: Annotated[
        float, typer.Option(help="DP-SGD noise multiplier.")
    ] = SimulationConfig.noise_multiplier,
    backend: Annotated[
        str, typer.Option(help="'ray' (Flower's simulation engine) or 'inprocess' (threads).")
    ] = SimulationConfig.backend,
    num_gpus_per_client: Annotated[
        float, typer.Option(help="GPU share per virtual client (e.g. 0.1 shares one GPU).")
    ] = SimulationConfig.num_gpus_per_client,
    ray_address: Annotated[
        str, typer.Option(help="Attach to a running Ray cluster (e.g. 127.0.0.1:6379).")
    ] = "",
    run_dir: Annotated[
        Path, typer.Option(click_type=NON_EMPTY_PATH, help="Parent folder of run directories.")
    ] = Path("runs"),
    name: Annotated[str, typer.Option(help="Run directory name (default: dataset-time).")] = "",
    run_config: RunConfigOpt = None,
    fmt: FormatOpt = "table",
    json_out: JsonAliasOpt = False,
    **settings: Any,
) -> None:
    """Pretrain, distil, federate (SecAgg+ and DP-SGD), evaluate and report, locally.

    Every setting is a flag named like its --run-config key; a flag given on the command
    line wins over --run-config."""
    values = kebab_run_config(run_config)  # one spelling: a flag of the setting replaces it
    values.update(explicit_options(ctx, FLAGS))
    values.update(explicit_options(ctx, SETTING_FLAGS))
    values.setdefault("seed", seed)
    if "data-dir" in values:
        values["data-dir"] = str(values["data-dir"] or "")
    if "run-dir" in values:
        values["run-dir"] = str(values["run-dir"])
    config = from_flat(SimulationConfig, values)
    from simulation.pipeline import RunInterrupted, run_pipeline

    console = _ProgressConsole(stderr=True)
    # a bar redraws in place on a terminal; into a log (docker, CI, a file) it would show
    # nothing until the end, so there each stage and round is a line of its own
    lines = config.progress and not console.is_terminal
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        _RunClock(),
        console=console,
        disable=not config.progress or lines,
    ) as bar:
        task = bar.add_task("preparing", total=config.rounds, info="")
        started = time.monotonic()

        def show(description: str, text: str, completed: int | None = None) -> None:
            if lines:
                where = f" {completed}/{config.rounds}" if completed is not None else ""
                elapsed = timedelta(seconds=int(time.monotonic() - started))
                console.print(
                    f"{elapsed} {description}{where}: {text}", highlight=False, soft_wrap=True
                )
            elif completed is not None:
                bar.update(task, description=description, completed=completed, info=text)
            else:
                bar.update(task, description=description, info=text)

        def progress(stage: str, info: dict[str, Any]) -> None:
            if stage == "round":
                user_eps = info.get("epsilon_user")
                eps = (
                    f"user eps {_fmt(user_eps)}"
                    if user_eps is not None
                    else f"max client eps {_fmt(info.get('epsilon_record'))}"
                )
                text = (
                    f"ok {info['clients_ok']} declined {info['clients_declined']} "
                    f"failed {info['clients_failed']}"
                    f"{_clipped(info.get('clients_clipped'))} | "
                    f"valid HR@10 (sampled) {_fmt(info.get('valid_sampled_hr@10'))} | "
                    f"loss {_fmt(info.get('valid_loss'))} | {eps}"
                )
                show("round", text, info["round"])
            elif stage == "run":
                _stopping.root = Path(info["dir"])
                show("run", info["dir"])
            elif stage == "evaluate" and "model" in info:
                show(stage, str(info["model"]))
            elif stage == "evaluate" and threading.current_thread() is threading.main_thread():
                # the simulation engine put the default SIGTERM action back when it ended:
                # a `kill` during evaluation (minutes on ml-100k) left without the resume hint
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, _interrupt)
                show(stage, "every model on the protocol's test items")
            elif stage == "resume":
                show("resume", f"from the checkpoint of round {info['round']}", info["round"])
            else:
                show(stage, " ".join(f"{k}={v}" for k, v in info.items()))

        main = threading.current_thread() is threading.main_thread()  # signals: main only
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, _interrupt) for sig in stops} if main else {}
        try:
            summary = run_pipeline(config, progress)
        except RunInterrupted as stop:
            bar.stop()
            _exit_interrupted(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if json_out or fmt == "json":
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    _print_summary(summary)


class _ProgressConsole(Console):
    """The progress display's console (stderr). A reader of it that went away (``2>&1 |
    head``, quitting ``less``) ends the display, not the run: Rich's own answer to the
    broken pipe is ``SystemExit`` after pointing *standard output* at /dev/null, which,
    raised in the round callback on the simulation engine's server thread, ended that
    thread alone. The federation stopped after that round, and the run was evaluated and
    reported as finished with fewer rounds than asked, exit status 0, its summary table
    thrown away."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


class _RunClock(TimeElapsedColumn):
    """Elapsed time that keeps running once the rounds are done: evaluation follows them
    (minutes on ml-100k), and a clock stopped at the last round made the run look hung."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        if elapsed is None:
            return Text("-:--:--", style="progress.elapsed")
        return Text(str(timedelta(seconds=int(elapsed))), style="progress.elapsed")


STOP_WATCHDOG_S = 20.0
"""After a Ctrl-C or SIGTERM, the run leaves by itself within this many seconds even if the
interrupt got lost in the engine's code (it once outlived a SIGTERM on a loaded machine)."""


class _Stopping:
    """What an interrupt needs to know and has done (one run per process)."""

    def __init__(self) -> None:
        self.root: Path | None = None  # the run directory, once the pipeline has claimed it
        self.terminated = False  # SIGTERM (``kill``, ``timeout``, ``docker stop``), not Ctrl-C
        self.exiting = threading.Lock()  # held by whoever says goodbye: it is said once
        self.watchdog: threading.Timer | None = None


_stopping = _Stopping()


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop a run the same way: checkpoints kept, a resume hint, Ray shut
    down (SIGTERM otherwise aborted with Ray's C++ stack dump and no hint)."""
    _stopping.terminated = _stopping.terminated or signum == signal.SIGTERM
    from simulation.pipeline import quiet_engine_logs  # imported by the run already

    quiet_engine_logs()  # at once: the engine's threads see their actors die meanwhile
    if _stopping.watchdog is None:
        _stopping.watchdog = threading.Timer(STOP_WATCHDOG_S, _leave_anyway)
        _stopping.watchdog.daemon = True
        _stopping.watchdog.start()
    raise KeyboardInterrupt


def _leave_anyway() -> None:
    """The interrupt did not end the run in time: leave as the interrupt would have."""
    from simulation.pipeline import RunInterrupted
    from simulation.run_dir import has_progress

    root = _stopping.root
    resumable = root is not None and has_progress(root)
    _exit_interrupted(RunInterrupted(root or Path("."), resumable=resumable))


def _exit_interrupted(stop: RunInterrupted) -> NoReturn:
    """Say what an interrupted run kept and leave at once (exit status 130, or 143 after
    SIGTERM).

    At once: the simulation engine's worker threads wait on Ray actors that the interrupt
    stopped, and the interpreter would wait for them for ever at a normal exit. Nothing is
    lost by not waiting: every checkpoint and ledger is written atomically when it is
    written, so the run resumes from its last finished round as after a crash."""
    if not _stopping.exiting.acquire(blocking=False):  # the other path is already leaving
        threading.Event().wait()  # until its os._exit
    if stop.resumable:
        message = (
            f"interrupted: {stop.root} keeps what the run did (the checkpoint of every "
            f"finished round, the privacy ledgers); rerun the same command (its options and "
            f"--run-config: the run continues only with its own settings) with --name "
            f"{shlex.quote(stop.root.name)} (and --run-dir {shlex.quote(str(stop.root.parent))})"
            " to resume"
        )
    else:
        message = "interrupted before the first round finished; nothing to resume"
    # a reader gone (`2>&1 | head`, then Ctrl-C) must not skip Ray's shutdown and the exit
    with contextlib.suppress(OSError):
        colored(message, "yellow")
    status = 143 if _stopping.terminated else 130
    ray = sys.modules.get("ray")  # imported only if the run got as far as starting Ray
    with contextlib.suppress(Exception):  # Ray's processes would otherwise outlive us
        if ray is not None and ray.is_initialized():
            watchdog = threading.Timer(10.0, os._exit, args=(status,))  # a hung shutdown
            watchdog.daemon = True
            watchdog.start()
            ray.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            if stream is not None:  # None: started with it closed (`>&-`)
                stream.flush()
    os._exit(status)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _clipped(count: object) -> str:
    """`` clipped N`` for a round whose updates the server clipped, else nothing."""
    return f" clipped {count}" if isinstance(count, int) and count > 0 else ""


def _print_summary(summary: dict[str, Any]) -> None:
    console = Console()
    table = Table(title="Test (leave-one-out), HR@10 / NDCG@10")
    for col in ("model", "population", "sampled HR", "sampled NDCG", "full HR", "full NDCG"):
        table.add_column(col)
    for model, pops in summary["final"].items():
        for pop, m in pops.items():
            table.add_row(
                model,
                pop,
                f"{m['sampled_hr@10']:.4f}",
                f"{m['sampled_ndcg@10']:.4f}",
                f"{m['full_hr@10']:.4f}",
                f"{m['full_ndcg@10']:.4f}",
            )
    print_table(table, console)
    paired = summary.get("paired", {}).get("federated", {})
    if paired:
        from simulation.report import format_difference

        diffs = Table(title="Federated users, HR@10 A - B (95% interval over users)")
        for col in ("A - B", "sampled", "full"):
            diffs.add_column(col)
        for pair, d in paired.items():
            diffs.add_row(
                pair, format_difference(d["sampled_hr@10"]), format_difference(d["full_hr@10"])
            )
        print_table(diffs, console)
    # one line whatever its length: a path broken over two lines is no path to a script
    # (`| tail -1`, a log grep) nor to a copy from the terminal
    console.print(f"report: {summary['meta']['run directory']}/report.md", soft_wrap=True)
