"""How ``gradtool train`` shows a run: a rich progress bar on stderr and a final table."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class RichProgress:
    """A ``progress(kind, info)`` callback for :func:`gradtool.train.train`."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                            MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"
                                       "  {task.fields[rate]:,.0f} samples/s"),
                            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                            console=console, transient=True,
                            # a bar only where it can redraw itself: into a pipe or a file it
                            # drew nothing useful and left an empty line before the next one
                            disable=quiet or not console.is_terminal)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def __call__(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        if kind == "verified":
            how = "cached" if info["cached"] else \
                f"{info['comparisons']} comparisons, {info['seconds']:.1f} s"
            forms = " + eval form" if len(info["forms"]) > 1 else ""
            self.console.print(f"[green]verified[/] {info['spec']}{forms} ({how})")
        elif kind == "compiling":
            self.console.print("compiling the model with torch.compile (this takes a while)…")
        elif kind == "compiled":
            self.console.print(f"[green]compiled[/] the model and checked it against itself "
                               f"uncompiled on one batch ({info['seconds']:.1f} s)")
        elif kind == "start":
            procs = info.get("world_size", 1)
            on = f"{procs} processes ({info['device']} on rank 0)" if procs > 1 else info["device"]
            self.console.print(f"run folder {info['run_dir']} on {on}")
            dropped = info.get("dropped_last_batch")
            if dropped:
                n = dropped["samples"]
                self.console.print(
                    f"[yellow]note[/] the last training batch of each epoch ({n} sample"
                    f"{'s' if n != 1 else ''}) is dropped: {escape(dropped['reason'])}",
                    highlight=False)
            total = info["steps"] * info["epochs"]
            self.task = self.bar.add_task("train", total=total,
                                          completed=info["steps"] * info["start_epoch"],
                                          epoch=info["start_epoch"] + 1, loss=0.0, acc=0.0,
                                          rate=0.0)
        elif kind == "step" and self.task is not None:
            self.bar.update(self.task, advance=1, epoch=info["epoch"] + 1, loss=info["loss"],
                            acc=info["acc"], rate=info["samples_per_s"])
        elif kind == "epoch":
            self.console.print(
                f"epoch {info['epoch']:3d}  train loss {info['train_loss']:.4f} "
                f"acc {info['train_acc']:.4f}  val loss {info['val_loss']:.4f} "
                f"acc {info['val_acc']:.4f}  lr {info['lr']:.3g}  "
                f"{info['samples_per_s']:,.0f} samples/s", soft_wrap=True)


def result_table(result) -> Table:
    table = Table(title="gradtool train", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("test accuracy", f"{result.test_acc:.4f}")
    table.add_row("test loss", f"{result.test_loss:.4f}")
    table.add_row("best val accuracy", f"{result.best_val_acc:.4f} (epoch {result.best_epoch})")
    table.add_row("epochs", str(result.epochs))
    table.add_row("time", f"{result.seconds:.1f} s ({result.samples_per_s:,.0f} samples/s)")
    table.add_row("verified", "no (--no-verify)" if result.unverified else
                  ", ".join(v["spec"] for v in result.verified))
    table.add_row("run folder", result.run_dir)
    return table
