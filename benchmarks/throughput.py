"""Training throughput: the model alone, then the full step with each data pipeline.

    python benchmarks/throughput.py --data data/10-monkey-species           # one GPU, 224 px, batch 256, bf16
    python benchmarks/throughput.py --data data/10-monkey-species --compile
    python benchmarks/throughput.py --tiny                                  # CPU smoke run (tests use it)

All measurements run the package's own training epoch (`engine.train_one_epoch`)
on the same model, optimizer and precision:

1. model alone: pre-made, normalised synthetic batches already on the device;
2. resident pipeline: the resident uint8 views, device-side shuffling and batched
   GPU augmentation (`pipeline.ResidentPipeline` + `augment.Augmenter`);
3. on a GPU, the same with each step replayed from a CUDA graph (`graphed.GraphedStep`,
   what --cuda-graphs trains with);
4. stream pipeline: DataLoader workers decoding the image files every epoch.

Without --data, a generated synthetic image-folder set is used (small PNGs:
decoding them is cheaper than the real JPEGs, so the stream figure flatters).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator

from monkeytrain.averaging import weight_averager
from monkeytrain.config import TrainConfig
from monkeytrain.data.augment import Augmenter, AugmentSettings
from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.data.pipeline import ResidentPipeline, StreamPipeline
from monkeytrain.data.synthetic import ensure_synthetic_dataset
from monkeytrain.data.views import view_bytes
from monkeytrain.engine import BatchStep, Learner, train_one_epoch
from monkeytrain.graphed import CudaGraphs, GraphedStep
from monkeytrain.model import compiled, create_model
from monkeytrain.optim import build_optimizer, hold_lr_in_tensors

# ImageNet statistics: throughput does not depend on the exact values.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="dataset root (default: the generated synthetic set)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--precision", default="bf16", choices=("no", "fp16", "bf16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--num-workers", type=int, default=12, help="stream pipeline DataLoader workers")
    parser.add_argument("--cache-dir", default=None, help="views/compile cache (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 32 px, batch 8, a few steps")
    args = parser.parse_args()
    if args.tiny:
        args.image_size, args.batch_size, args.steps, args.warmup_steps = 32, 8, 3, 1
        args.precision, args.num_workers = "no", 0
    return args


class Bench:
    """One model, optimizer and accelerator, timed over different batch sources."""

    def __init__(self, args, accelerator: Accelerator, num_classes: int, cache_dir: Path):
        self.args, self.accelerator = args, accelerator
        config = TrainConfig(lr=0.01, weight_decay=5e-5)
        plain = create_model(args.model, num_classes, image_size=args.image_size)
        plain = plain.to(accelerator.device, memory_format=torch.channels_last)
        self.averager = weight_averager(plain, 0.0)
        optimizer = build_optimizer(plain, config, accelerator.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(plain, optimizer, scheduler)
        hold_lr_in_tensors(self.optimizer, accelerator.device)  # as the trainer does
        self.model = compiled(self.model, args.compile, cache_dir)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def images_per_second(self, batches, augment, graphs: CudaGraphs | None = None) -> float:
        """Warm up (and capture, with `graphs`), then time `steps` steps (the epoch ends with one host sync)."""
        learner = Learner(self.model, self.optimizer, self.scheduler, self.criterion, self.averager, augment)
        step = (GraphedStep(learner, self.accelerator, lambda: self.args.image_size, graphs) if graphs
                else BatchStep(learner, self.accelerator))
        for steps in (self.args.warmup_steps, self.args.steps):
            stats = train_one_epoch(step, itertools.islice(batches, steps), self.accelerator)
        return stats.images_per_second


def gpu_memory_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def forever(pipeline):
    """Epoch after epoch of whole epochs, as training sees them."""
    return itertools.chain.from_iterable(
        pipeline.train_epoch(epoch) for epoch in itertools.count(1))


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(cpu=args.tiny, mixed_precision=args.precision)
    device = accelerator.device
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(args.cache_dir or scratch)
        root = Path(args.data) if args.data else ensure_synthetic_dataset(cache_dir)
        splits = discover_splits(folders_from_root(root), 0.1, 0, strict=False)
        bench = Bench(args, accelerator, len(splits.class_names), cache_dir)
        augmenter = Augmenter(AugmentSettings(), args.image_size, MEAN, STD,
                              torch.Generator(device).manual_seed(0))

        synthetic = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        synthetic = synthetic.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, len(splits.class_names), (args.batch_size,), device=device)
        alone = bench.images_per_second(itertools.repeat((synthetic, labels)), lambda x: x)

        started, allocated = time.perf_counter(), gpu_memory_allocated(device)
        resident = ResidentPipeline(splits, args.image_size, args.batch_size, 0, cache_dir, accelerator)
        load_seconds = time.perf_counter() - started
        # What holding the data costs on the device, against the raw uint8 size of the views.
        held = gpu_memory_allocated(device) - allocated if device.type == "cuda" else resident.resident_bytes
        raw = view_bytes(sum(len(files) for files in splits.named_splits().values()), args.image_size)
        kept = bench.images_per_second(forever(resident), augmenter.train)
        graphed = (bench.images_per_second(forever(resident), augmenter.train, CudaGraphs(augmenter.generator))
                   if device.type == "cuda" else None)
        stream = StreamPipeline(splits, args.image_size, args.batch_size, 0, args.num_workers, accelerator)
        streamed = bench.images_per_second(forever(stream), augmenter.train)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.model}, {args.image_size} px, batch {args.batch_size}, {args.precision}, "
          f"compile {args.compile}, channels_last")
    print(f"model alone       {alone:10.0f} images/s")
    print(f"resident pipeline {kept:10.0f} images/s   {kept / alone:6.1%} of model alone")
    if graphed:
        print(f"resident, graphed {graphed:10.0f} images/s   {graphed / alone:6.1%} of model alone "
              f"(each step replayed from a CUDA graph)")
    print(f"stream pipeline   {streamed:10.0f} images/s   {streamed / alone:6.1%} of model alone "
          f"({args.num_workers} workers)")
    print(f"resident / stream {kept / streamed:10.2f}x")
    print(f"resident views   {held / 2**20:10.1f} MiB  ({held / raw:.3f}x the raw uint8 size), "
          f"loaded in {load_seconds:.1f} s")
    if device.type == "cuda":
        print(f"peak GPU memory  {torch.cuda.max_memory_allocated(device) / 2**30:10.2f} GiB")
    accelerator.end_training()


if __name__ == "__main__":
    main()
