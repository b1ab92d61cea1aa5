"""Train Glow or a NanoFlow variant on CIFAR-10 or SVHN: the image density experiments of
NanoFlow (Lee, Kim, Yoon, NeurIPS 2020), with the original's command line, e.g.

    python train.py --seed 1234 --output_dir output/nanoflow \
        --model_type nanoflow --hidden_channels 256 --flow_embed_dim 1 --epochs 3000

Each epoch: training with a progress bar, `bits/dim` on the test set, checkpoints
`glow_model_<epoch>.pth` / `glow_optimizer_<epoch>.pth` (the last two kept), a grid of
samples `samples_<epoch>.png` and TensorBoard scalars, all in --output_dir. With --evaluate, a checkpoint's
`bits/dim` on the test set, nothing written:

    python train.py --evaluate --saved_model output/nanoflow/glow_model_3000.pth \
        --model_type nanoflow --hidden_channels 256 --flow_embed_dim 1
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import zipfile
from itertools import islice

import matplotlib.image
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from glow_model import MODEL_TYPES, Glow
from image_datasets import DatasetNotFoundError, ImageDataset, dataset_paths, get_datasets

WEIGHT_DECAY = 5e-5
CHECKPOINTS_KEPT = 2
SAMPLE_GRID_SIDE = 8  # an 8 x 8 grid of samples each epoch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train Glow or a NanoFlow variant on CIFAR-10 or SVHN (NanoFlow's image density experiments)."
    )
    add = parser.add_argument
    default = " (default: %(default)s)"
    add("--model_type", default="glow", choices=list(MODEL_TYPES), help="which flow to train" + default)
    add("--dataset", default="cifar10", choices=["cifar10", "svhn"], help="dataset" + default)
    add("--dataroot", default="./", help="datasets folder (they go in data/CIFAR10/, data/SVHN/)" + default)
    add("--download", action="store_true", help="download the dataset if it is missing")
    add("--no_augment", action="store_false", dest="augment", help="no random translation or flip")
    add("--hidden_channels", type=int, default=512, help="channels of the coupling networks" + default)
    add("--K", type=int, default=32, help="flow steps per level" + default)
    add("--L", type=int, default=3, help="levels" + default)
    add("--actnorm_scale", type=float, default=1.0, help="std of ActNorm outputs at initialisation" + default)
    permutations = ["invconv", "shuffle", "reverse"]
    add("--flow_permutation", default="invconv", choices=permutations, help="channel mixing" + default)
    add("--flow_coupling", default="affine", choices=["additive", "affine"], help="coupling" + default)
    add("--no_LU_decomposed", action="store_false", dest="LU_decomposed", help="1x1 convs not LU-decomposed")
    # 512 as the original's: its README's commands, parsed there, record 512 where none is given (glow_large's).
    add("--flow_embed_dim", type=int, default=512, help="nanoflow: embedding channels at the first level" + default)
    add("--no_learn_top", action="store_false", dest="learn_top", help="fixed N(0, 1) top prior")
    add("--y_condition", action="store_true", help="class-conditional prior and a classifier on the latents")
    add("--y_weight", type=float, default=0.01, help="weight of the classification loss" + default)
    add("--max_grad_clip", type=float, default=0, help="clip gradient values above this, 0: off" + default)
    add("--max_grad_norm", type=float, default=0, help="clip the gradient norm above this, 0: off" + default)
    add("--n_workers", type=int, default=min(6, os.cpu_count() or 1), help="data loading processes" + default)
    add("--batch_size", type=int, default=64, help="training batch size" + default)
    add("--eval_batch_size", type=int, default=512, help="evaluation batch size" + default)
    add("--epochs", type=int, default=250, help="train until this epoch" + default)
    add("--lr", type=float, default=5e-4, help="learning rate of Adamax" + default)
    add("--warmup", type=float, default=5, help="epochs of linear learning-rate warm-up" + default)
    add("--n_init_batches", type=int, default=8, help="batches for ActNorm's data-dependent init" + default)
    add("--no_cuda", action="store_false", dest="cuda", help="run on the CPU even if CUDA is there")
    add("--output_dir", default="output/", help="folder for checkpoints, samples and logs" + default)
    add("--fresh", action="store_true", help="empty --output_dir first")
    add("--saved_model", default="", help="model checkpoint to resume from, glow_model_<epoch>.pth")
    add("--evaluate", action="store_true", help="only print --saved_model's test bits/dim; writes no --output_dir")
    add("--saved_optimizer", default="", help="optimizer checkpoint to resume from, glow_optimizer_<epoch>.pth")
    add("--seed", type=int, default=0, help="random seed" + default)
    add("--subset", type=int, default=0, help="use only the first N images of each split, 0: all" + default)
    add("--temperature", type=float, default=0.7, help="temperature of the samples saved each epoch" + default)
    args = parser.parse_args(argv)
    check_ranges(args)
    if args.saved_optimizer and not args.saved_model:
        sys.exit("error: --saved_optimizer goes with --saved_model (the weights the optimizer state belongs to)")
    if args.evaluate:
        if not args.saved_model:
            sys.exit("error: --evaluate needs --saved_model, the checkpoint to evaluate")
        for flag in ("saved_optimizer", "fresh"):
            if getattr(args, flag):
                sys.exit(f"error: --evaluate reads only the model and writes no --output_dir; leave out --{flag}")
    return args


# The least value of each flag that has one; a value below it is refused in one line naming the flag.
MINIMUMS = {
    "batch_size": 1,
    "eval_batch_size": 1,
    "epochs": 1,
    "hidden_channels": 1,
    "K": 1,
    "L": 1,
    "n_init_batches": 1,
    "n_workers": 0,
    "subset": 0,
    "flow_embed_dim": 0,
    "warmup": 0,
    "y_weight": 0,
    "max_grad_clip": 0,
    "max_grad_norm": 0,
    "temperature": 0,
}


def check_ranges(args: argparse.Namespace) -> None:
    for name, minimum in MINIMUMS.items():
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= minimum):
            sys.exit(f"error: --{name} must be >= {minimum}, got {value:g}")
    if not 0 <= args.seed < 2**32:  # numpy's seeds
        sys.exit(f"error: --seed must be in [0, 2**32 - 1], got {args.seed}")
    if not args.output_dir:
        sys.exit("error: --output_dir is empty; name the folder for checkpoints, samples and logs")
    for name in ("lr", "actnorm_scale"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            sys.exit(f"error: --{name} must be positive, got {value:g}")


class CheckpointError(ValueError):
    """A --saved_model or --saved_optimizer that does not fit the model the flags describe; one line."""


def main(argv: list[str] | None = None) -> None:
    """Everything that can refuse the command (flags, data, checkpoints, the output folder) before
    anything is written."""
    args = parse_args(argv)
    check_resume_files(args)
    if args.evaluate:
        evaluate_checkpoint(args)
        return
    check_fresh(args)
    check_output_dir(args.output_dir, args.fresh)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    try:
        image_shape, num_classes, train_set, test_set = get_datasets(
            args.dataset, args.dataroot, args.augment, args.download, args.subset
        )
        check_levels(args.L, image_shape)
        if args.model_type == "nanoflow" and image_shape[0] >> args.L == 1:
            print(
                f"warning: --L {args.L}: the last level's maps are 1 x 1, and its flow embeddings' ActNorm starts "
                f"from one value per channel (as the original's): a scale of about 1e6, a poor start; --L "
                f"{args.L - 1} avoids it",
                file=sys.stderr,
            )
        if len(train_set) < args.batch_size:
            sys.exit(f"error: {len(train_set)} training images is less than one batch of {args.batch_size}")
        set_seed(args.seed)
        model = build_model(args, image_shape, num_classes).to(device)
        optimizer = torch.optim.Adamax(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
        start_epoch = 0
        if args.saved_model:
            start_epoch = load_checkpoint(model, optimizer, args.saved_model, args.saved_optimizer, device)
            if start_epoch >= args.epochs:
                sys.exit(
                    f"error: --epochs {args.epochs}: {args.saved_model} is already at epoch {start_epoch}; "
                    "resume to a later --epochs"
                )
        prepare_output_dir(args.output_dir, args.fresh)
    except (DatasetNotFoundError, CheckpointError, FileExistsError) as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # the output folder cannot be made or emptied
        where = error.filename if error.filename is not None else args.output_dir
        sys.exit(f"error: --output_dir {where}: {error.strerror or error}")
    with open(os.path.join(args.output_dir, "hparams.json"), "w") as file:
        hparams = {key: value for key, value in vars(args).items() if key != "fresh"}
        json.dump(hparams, file, sort_keys=True, indent=4)
    train(args, device, model, optimizer, start_epoch, num_classes, train_set, test_set)


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """--evaluate: the test set's mean bits/dim (and class loss) of --saved_model, the model the flags describe,
    printed; the dequantization noise drawn from --seed. Nothing is written."""
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    try:
        image_shape, num_classes, _, test_set = get_datasets(
            args.dataset, args.dataroot, False, args.download, args.subset
        )
        check_levels(args.L, image_shape)
        model = build_model(args, image_shape, num_classes).to(device)
        epoch = load_checkpoint(model, None, args.saved_model, "", device)
    except (DatasetNotFoundError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    print(f"num_param: {model.num_parameters()}")
    set_seed(args.seed)
    loader = DataLoader(test_set, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.n_workers)
    metrics = evaluate(model, loader, args, num_classes, device)
    trained = f" (epoch {epoch})" if epoch else ""  # the epoch in its file name, as resuming reads it
    print(
        f"{args.saved_model}{trained}, {len(test_set)} test images: "
        + ", ".join(f"{name}: {value:.4f}" for name, value in metrics.items())
    )


def check_levels(levels: int, image_shape: tuple[int, int, int]) -> None:
    """Each level's squeeze halves the image's side: it must divide by 2 ** --L."""
    height, width, _ = image_shape
    if height % 2**levels or width % 2**levels:
        most = min((height & -height).bit_length(), (width & -width).bit_length()) - 1
        sys.exit(
            f"error: --L {levels}: each level halves the side of the {height} x {width} images, which allow at "
            f"most {most} levels"
        )


def build_model(args: argparse.Namespace, image_shape: tuple[int, int, int], num_classes: int) -> Glow:
    return Glow(
        image_shape,
        args.hidden_channels,
        args.K,
        args.L,
        args.actnorm_scale,
        args.flow_permutation,
        args.flow_coupling,
        args.LU_decomposed,
        num_classes,
        args.learn_top,
        args.y_condition,
        args.model_type,
        args.flow_embed_dim,
    )


def check_resume_files(args: argparse.Namespace) -> None:
    """Before any work: the checkpoints to resume from exist."""
    for path in (args.saved_model, args.saved_optimizer):
        if path and not os.path.isfile(path):
            sys.exit(f"error: {path}: checkpoint not found")


def check_fresh(args: argparse.Namespace) -> None:
    """--fresh deletes --output_dir: not when the checkpoints to resume from, the dataset or this program
    lie in it."""
    if not args.fresh:
        return
    output_dir = os.path.realpath(args.output_dir)
    spared = [(path, "the checkpoint to resume from; resume into") for path in (args.saved_model, args.saved_optimizer)]
    spared += [(path, "the dataset; give") for path in dataset_paths(args.dataset, args.dataroot)]
    spared.append((os.path.dirname(os.path.abspath(__file__)), "this program's folder; give"))
    for path, what in spared:
        # With --download the dataset's place counts before the dataset is there: it would be fetched, then deleted.
        there = os.path.exists(path) or (args.download and what.startswith("the dataset"))
        if path and there and os.path.commonpath([os.path.realpath(path), output_dir]) == output_dir:
            sys.exit(f"error: --fresh would delete {path}, {what} another --output_dir")


def check_output_dir(output_dir: str, fresh: bool) -> None:
    """Before any work (a download, minutes): --output_dir must be a folder that is new or empty, or --fresh;
    `prepare_output_dir` makes it so once everything else has been read."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        sys.exit(f"error: --output_dir {output_dir} is a file, not a folder")
    if fresh and os.path.islink(output_dir):
        sys.exit(f"error: --fresh would empty {output_dir}, a link to {os.path.realpath(output_dir)}; name the folder")
    if not fresh and os.path.isdir(output_dir) and os.listdir(output_dir):
        sys.exit(f"error: {output_dir} is not empty; give a new or empty --output_dir, or --fresh")


def prepare_output_dir(output_dir: str, fresh: bool) -> None:
    """Refuse to mix runs: the folder must be new or empty, unless --fresh empties it."""
    if fresh and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if os.listdir(output_dir):
        raise FileExistsError(f"{output_dir} is not empty; give a new or empty --output_dir, or --fresh")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    args: argparse.Namespace,
    device: torch.device,
    model: Glow,
    optimizer: torch.optim.Optimizer,
    start_epoch: int,
    num_classes: int,
    train_set: ImageDataset,
    test_set: ImageDataset,
) -> None:
    """Epochs `start_epoch + 1` to --epochs; a model not resumed (no --saved_model) first has its ActNorm
    initialised."""
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.n_workers, drop_last=True
    )
    test_loader = DataLoader(test_set, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.n_workers)
    print(f"num_param: {model.num_parameters()}")
    if not args.saved_model:
        initialize_actnorm(model, train_loader, args.n_init_batches, args.y_condition, num_classes, device)
    writer = SummaryWriter(args.output_dir)
    step = start_epoch * len(train_loader)
    for epoch in range(start_epoch + 1, args.epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_factor(epoch, args.warmup)
        progress = tqdm(train_loader, desc=f"epoch {epoch}", dynamic_ncols=True)
        for x, y in progress:
            metrics = train_step(model, optimizer, x.to(device), y.to(device), args, num_classes)
            step += 1
            progress.set_postfix(metrics)
            for name, value in metrics.items():
                writer.add_scalar(f"train/{name}", value, step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        metrics = evaluate(model, test_loader, args, num_classes, device)
        print(f"Epoch {epoch} validation: " + ", ".join(f"{name}: {value:.4f}" for name, value in metrics.items()))
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, step)
        save_checkpoint(args.output_dir, epoch, model, optimizer)
        samples_path = os.path.join(args.output_dir, f"samples_{epoch}.png")
        save_samples(model, samples_path, args.temperature, num_classes, args.y_condition)
    writer.close()


def warmup_factor(epoch: int, warmup: float) -> float:
    """Learning-rate factor of 1-based `epoch`: linear from 1/warmup to 1 over `warmup` epochs."""
    return min(1.0, epoch / warmup) if warmup > 0 else 1.0


def one_hot(y: torch.Tensor, num_classes: int, y_condition: bool) -> torch.Tensor | None:
    return F.one_hot(y, num_classes).float() if y_condition else None


@torch.no_grad()
def initialize_actnorm(
    model: Glow, loader: DataLoader, n_init_batches: int, y_condition: bool, num_classes: int, device: torch.device
) -> None:
    """ActNorm's data-dependent initialisation (Glow sec. 3.1) on one pass of
    `n_init_batches` training batches together."""
    model.train()
    batches = list(islice(loader, n_init_batches))
    x = torch.cat([x for x, _ in batches]).to(device)
    y = torch.cat([y for _, y in batches]).to(device)
    model(x, one_hot(y, num_classes, y_condition))


def compute_losses(
    bits_per_dim: torch.Tensor, y_logits: torch.Tensor | None, y: torch.Tensor, y_weight: float
) -> dict[str, torch.Tensor]:
    """Per-image losses [B]: bits/dim, plus the weighted class loss under --y_condition."""
    losses = {"bits/dim": bits_per_dim}
    if y_logits is not None:
        losses["class_loss"] = F.cross_entropy(y_logits, y, reduction="none")
        losses["total_loss"] = bits_per_dim + y_weight * losses["class_loss"]
    return losses


def train_step(
    model: Glow,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    args: argparse.Namespace,
    num_classes: int,
) -> dict[str, float]:
    model.train()
    optimizer.zero_grad()
    _, bits_per_dim, y_logits = model(x, one_hot(y, num_classes, args.y_condition))
    losses = compute_losses(bits_per_dim, y_logits, y, args.y_weight)
    losses = {name: value.mean() for name, value in losses.items()}
    losses.get("total_loss", losses["bits/dim"]).backward()
    if args.max_grad_clip > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), args.max_grad_clip)
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    return {name: value.item() for name, value in losses.items()}


@torch.no_grad()
def evaluate(
    model: Glow, loader: DataLoader, args: argparse.Namespace, num_classes: int, device: torch.device
) -> dict[str, float]:
    """Mean of each loss over the whole test set."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        _, bits_per_dim, y_logits = model(x, one_hot(y, num_classes, args.y_condition))
        for name, value in compute_losses(bits_per_dim, y_logits, y, args.y_weight).items():
            sums[name] = sums.get(name, 0.0) + value.sum().item()
        count += len(x)
    return {name: total / count for name, total in sums.items()}


def save_checkpoint(output_dir: str, epoch: int, model: Glow, optimizer: torch.optim.Optimizer) -> None:
    """State dicts in the original's files and names; older epochs beyond the last two are removed."""
    for name, module in (("model", model), ("optimizer", optimizer)):
        torch.save(module.state_dict(), os.path.join(output_dir, f"glow_{name}_{epoch}.pth"))
        stale = os.path.join(output_dir, f"glow_{name}_{epoch - CHECKPOINTS_KEPT}.pth")
        if os.path.exists(stale):
            os.remove(stale)


def load_checkpoint(
    model: Glow,
    optimizer: torch.optim.Optimizer | None,
    model_path: str,
    optimizer_path: str,
    device: torch.device,
) -> int:
    """Loads the model (and the optimizer, if `optimizer_path`); returns the epoch in the file name
    (`glow_model_<epoch>.pth`, 0 if it has none), from which training resumes. Files that do not fit the
    model the flags describe are a CheckpointError."""
    state = read_state_dict(model_path, device)
    # The original kept Permute2d's indices out of the state dict; a reversal's are those of every model.
    for name, value in model.state_dict().items():
        if name not in state and re.search(r"\.reverse\.indices(_inverse)?$", name):
            state[name] = value
    check_fits(model, state, model_path)
    model.load_state_dict(state)
    # ActNorm's initialisation is not in the state dict, but its result is.
    model.set_actnorm_init()
    if optimizer and optimizer_path:
        try:
            optimizer.load_state_dict(read_state_dict(optimizer_path, device))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{optimizer_path}: not the optimizer state of {model_path}'s model ({first_sentence(error)})"
            ) from None
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                for value in optimizer.state[parameter].values():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape != parameter.shape:
                        raise CheckpointError(
                            f"{optimizer_path}: not the optimizer state of {model_path}'s model (a state of shape "
                            f"{list(value.shape)} for a parameter of shape {list(parameter.shape)})"
                        )
    match = re.search(r"_(\d+)\.\w+$", model_path)
    return int(match.group(1)) if match else 0


def read_state_dict(path: str, device: torch.device) -> dict:
    """A state dict that torch.save wrote, read without unpickling code."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch.load raises many types for a file it cannot read
        why = "" if not zipfile.is_zipfile(path) else f" ({first_sentence(error)})"
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save{why}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (holds a {type(state).__name__})")
    return state


def check_fits(model: Glow, state: dict, path: str) -> None:
    """Refuse weights whose names or shapes differ from those of the model the flags describe."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        f"{name} {list(state[name].shape)} vs {list(value.shape)}"
        for name, value in expected.items()
        if isinstance(state.get(name), torch.Tensor) and state[name].shape != value.shape
    ]
    others = [name for name, value in state.items() if name in expected and not isinstance(value, torch.Tensor)]
    problems = [
        f"{len(names)} {what} ({describe(names)})"
        for names, what in (
            (missing, "tensors missing"),
            (unexpected, "unexpected"),
            (reshaped, "of another shape"),
            (others, "not tensors"),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{path}: not a checkpoint of the model these flags describe (--model_type, --hidden_channels, --K, "
            f"--L, --flow_embed_dim, ... as in its run's hparams.json): " + "; ".join(problems)
        )


def describe(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split())
    return (text.split(". ")[0][:160] or type(error).__name__).rstrip(".")


@torch.no_grad()
def save_samples(model: Glow, path: str, temperature: float, num_classes: int, y_condition: bool) -> None:
    """A grid of SAMPLE_GRID_SIDE^2 samples as a PNG (under --y_condition, of classes 0, 1, ... in turn, row by
    row)."""
    model.eval()
    num_samples = SAMPLE_GRID_SIDE**2
    device = model.prior_h.device
    y = torch.arange(num_samples, device=device) % num_classes
    images = model.sample(num_samples, temperature, one_hot(y, num_classes, y_condition))
    images = (images + 0.5).clamp(0, 1).cpu()  # [N, C, H, W]
    _, channels, height, width = images.shape
    grid = images.view(SAMPLE_GRID_SIDE, SAMPLE_GRID_SIDE, channels, height, width)
    grid = grid.permute(0, 3, 1, 4, 2).reshape(SAMPLE_GRID_SIDE * height, SAMPLE_GRID_SIDE * width, channels)
    matplotlib.image.imsave(path, grid.squeeze(-1).numpy())


if __name__ == "__main__":
    main()
