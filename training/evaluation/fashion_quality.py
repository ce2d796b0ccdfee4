"""How good a shipped Fashion-MNIST test bed is: its network's samples (decoded, for a latent bed) scored by the
shipped classifier.

    python -m consistency_solver.training.evaluation.fashion_quality --samples 500 --grid outputs/fashion_samples.png
    python -m consistency_solver.training.evaluation.fashion_quality --bed fashion-flow-cfg --samples 500

samples held-out seeds with the shared multistep reference (100 steps) and reports the classifier's label
accuracy on them and the Frechet distance in its features to the real test set, beside the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..testbeds import FASHION_BED, FASHION_BEDS
from ..testbeds.fashion import CLASSIFIER_WEIGHTS, FashionTestBed, load_classifier, load_fashion_mnist
from .metrics import frechet_distance, label_agreement
from .references import held_out_seeds, reference_finals, seeded_batch


@torch.no_grad()
def evaluate(
    weights: Path | None,
    classifier: Path,
    samples: int,
    sample_steps: int,
    guidance: float,
    grid: Path | None,
    bed_name: str = FASHION_BED,
) -> dict[str, float | str]:
    """Class-conditional samples of bed ``bed_name`` (with the network weights ``weights``, or the bed's shipped ones
    when None) scored by the classifier against the real test set."""
    bed = FashionTestBed(bed_name, guidance=guidance, weights=weights)
    scorer = load_classifier(classifier)
    noise, labels = seeded_batch(bed, held_out_seeds(samples))
    generated = torch.cat(
        [
            reference_finals(bed, noise_chunk, label_chunk, method="multistep", steps=sample_steps)
            for noise_chunk, label_chunk in zip(noise.split(250), labels.split(250), strict=True)
        ]
    )
    test_images, test_labels = load_fashion_mnist("test")
    real, other_real = test_images[:samples], test_images[5000 : 5000 + samples]
    clipped = bed.decode(generated).clamp(-1, 1)
    results = {
        "bed": bed_name,
        "samples": samples,
        "sample_steps": sample_steps,
        "guidance": guidance,
        "label_accuracy": label_agreement(scorer(clipped), labels),
        "real_accuracy": label_agreement(scorer(real), test_labels[:samples]),
        "frechet_samples_vs_real": frechet_distance(scorer.features(clipped), scorer.features(real)),
        "frechet_real_vs_real": frechet_distance(scorer.features(other_real), scorer.features(real)),
    }
    if grid is not None:
        save_grid(clipped[labels.argsort(stable=True)][:200], grid)
    return results


def save_grid(images: Tensor, path: Path, columns: int = 20) -> None:
    """A PNG contact sheet of [n, 1, 28, 28] images in [-1, 1]."""
    from PIL import Image  # a dev dependency, only for looking at samples

    rows = math.ceil(len(images) / columns)
    padded = torch.cat([images, images.new_full((rows * columns - len(images), *images.shape[1:]), -1.0)])
    sheet = padded.reshape(rows, columns, 28, 28).permute(0, 2, 1, 3).reshape(rows * 28, columns * 28)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(((sheet + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bed", choices=FASHION_BEDS, default=FASHION_BED)
    parser.add_argument("--weights", type=Path, default=None, help="network weights (default: the bed's shipped ones)")
    parser.add_argument("--classifier", type=Path, default=CLASSIFIER_WEIGHTS)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sample-steps", type=int, default=100, help="steps of the ab4 multistep reference")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--grid", type=Path, default=None, help="PNG of up to 200 samples, sorted by class")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = evaluate(
        args.weights, args.classifier, args.samples, args.sample_steps, args.guidance, args.grid, args.bed
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
