"""What a run leaves to look at: metrics.csv (one row per epoch) and curves.png, beside the checkpoints.

Both are rewritten after every epoch (atomically), so they can be opened while the run goes on; a resumed
run keeps the rows of the epochs its checkpoint holds and continues them.
"""
import csv
import io
import math
import os

from ..files import atomic_path, write_text

FIELDS = ("epoch", "train_loss", "lr", "val_top1", "val_top5", "val_loss", "img_per_s", "seconds")


class MetricsLog:
    def __init__(self, folder, start_epoch=0):
        self.csv_path = os.path.join(folder, "metrics.csv")
        self.png_path = os.path.join(folder, "curves.png")
        self.rows = [row for row in read_metrics(self.csv_path) if row["epoch"] <= start_epoch]

    def add(self, epoch, train_loss, lr, img_per_s, seconds, val=None):
        """One epoch's figures; `val`: the evaluation's metrics, or None when it was not evaluated."""
        val = val or {}
        self.rows.append({"epoch": epoch, "train_loss": train_loss, "lr": lr, "val_top1": val.get("top1"),
                          "val_top5": val.get("top5"), "val_loss": val.get("loss"), "img_per_s": img_per_s,
                          "seconds": seconds})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        write_text(self.csv_path, text.getvalue())
        draw_curves(self.rows, self.png_path)


def read_metrics(path):
    """The rows of a metrics.csv: numbers, None for an empty cell; [] when there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) if v != "" else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def draw_curves(rows, path):
    """Loss (train and val), val top-1/top-5, and lr against the epoch, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed, or wanted, on a training machine
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in rows]
    figure, (loss_axes, accuracy_axes, lr_axes) = plt.subplots(1, 3, figsize=(13, 3.6))
    _plot(loss_axes, epochs, rows, [("train_loss", "train"), ("val_loss", "val")], "loss")
    _plot(accuracy_axes, epochs, rows, [("val_top1", "top-1"), ("val_top5", "top-5")], "val accuracy")
    _plot(lr_axes, epochs, rows, [("lr", "lr at epoch end")], "learning rate")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def _plot(axes, epochs, rows, series, title):
    for key, label in series:
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row[key] is not None and math.isfinite(row[key])]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, label=label)
    axes.set_title(title)
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)
    if any(axes.get_legend_handles_labels()[1]):
        axes.legend()
