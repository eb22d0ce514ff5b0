"""Quality of the trained shapes preset, on held-out pictures and prompts.

    .venv/bin/python benchmarks/shapes_quality.py                    # the shipped preset
    .venv/bin/python benchmarks/shapes_quality.py --preset-dir DIR   # one `omnistage train shapes DIR` wrote

Captioning: N pictures of the shapes world, drawn with a seed the training never uses, each asked
"What is in this image?"; right when the answer names the picture's colour and shape (size and
place are reported too). Drawing: N instructions ("Draw a blue square"), each through the whole
path (LLM, signal tokens, output projector, generator); the picture's colour is right when the
palette colour nearest its saturated pixels is the one asked for, its shape when a small CNN
trained here on the shapes world says so, its place when those pixels' centre lies in the third
of the width asked for. The CNN's own accuracy on held-out renders is printed
first, so that its verdicts can be weighed. Everything runs in this process, seeded.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from omnistage.pipelines import shapes
from omnistage.pipelines.local import LocalPipeline
from omnistage.pipelines.train import IMAGE_SIZE, preset_config

TARGETS = {"caption": 0.9, "colour": 0.8, "shape": 0.6}


def shape_classifier(seed: int = 0, steps: int = 600) -> tuple[nn.Module, float]:
    """A small CNN that names the shape in a picture of the shapes world, and its accuracy on
    500 held-out renders."""
    rng = random.Random(f"classifier/{seed}")
    torch.manual_seed(seed)

    def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        specs = [shapes.random_spec(rng) for _ in range(n)]
        images = np.stack([shapes.render(s, IMAGE_SIZE, rng) for s in specs])
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return x, torch.tensor([shapes.SHAPES.index(s.shape) for s in specs])

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, len(shapes.SHAPES)),
    )
    x, y = data(4000)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_x, test_y = data(500)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    return model, accuracy


def classify(model: nn.Module, images: list[np.ndarray]) -> list[str]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return [shapes.SHAPES[i] for i in model(x).argmax(1).tolist()]


def caption_quality(pipeline: LocalPipeline, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(f"held-out captions/{seed}")
    right = {"caption": 0, "exact": 0}
    for _ in range(n):
        spec = shapes.random_spec(rng)
        image = shapes.render(spec, IMAGE_SIZE, rng)
        question = {"type": "text", "text": "What is in this image?"}
        answer = pipeline.chat(
            [{"role": "user", "content": [{"type": "image_url", "image_url": image}, question]}], max_tokens=16
        ).text
        right["caption"] += shapes.parse_caption(answer) == (spec.colour, spec.shape)
        right["exact"] += answer.strip() == shapes.caption(spec)
    return {key: value / n for key, value in right.items()}


def drawing_quality(pipeline: LocalPipeline, classifier: nn.Module, n: int, seed: int) -> dict[str, float]:
    rng = random.Random(f"held-out prompts/{seed}")
    asked, images = [], []
    for i in range(n):
        prompt, spec = shapes.instruction(rng)
        result = pipeline.chat([{"role": "user", "content": prompt}], max_tokens=16, seed=i, modalities=["image"])
        asked.append(spec)
        images.append(result.media[0].array)
    colours = [shapes.dominant_colour(image) for image in images]
    drawn_shapes = classify(classifier, images)
    return {
        "colour": sum(c == s.colour for c, s in zip(colours, asked)) / n,
        "shape": sum(d == s.shape for d, s in zip(drawn_shapes, asked)) / n,
        "both": sum(c == s.colour and d == s.shape for c, d, s in zip(colours, drawn_shapes, asked)) / n,
        "place": sum(place(image) == s.position for image, s in zip(images, asked)) / n,
    }


def place(image: np.ndarray) -> str | None:
    """left, middle or right: the third of the width holding the saturated pixels' centre."""
    columns = np.nonzero(shapes.saturated(image))[1]
    if len(columns) == 0:
        return None
    return shapes.POSITIONS[min(2, int(columns.mean() * 3 / image.shape[1]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset-dir", help="a preset written by `omnistage train shapes` (default: the shipped one)")
    parser.add_argument("-n", type=int, default=500, help="held-out pictures and prompts each (default: 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    start = time.monotonic()
    classifier, classifier_accuracy = shape_classifier(args.seed)
    print(f"shape classifier: {classifier_accuracy:.1%} right on 500 held-out renders")
    pipeline = LocalPipeline(preset_config(args.preset_dir)) if args.preset_dir else LocalPipeline.from_config("shapes")
    captions = caption_quality(pipeline, args.n, args.seed)
    drawings = drawing_quality(pipeline, classifier, args.n, args.seed)
    results = {
        "n": args.n,
        "caption (colour and shape right)": captions["caption"],
        "caption exact (size and place too)": captions["exact"],
        "drawing colour": drawings["colour"],
        "drawing shape": drawings["shape"],
        "drawing colour and shape": drawings["both"],
        "drawing place (not a target)": drawings["place"],
        "shape classifier on renders": classifier_accuracy,
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(results, indent=2))
    for key, target in TARGETS.items():
        got = {"caption": captions["caption"], "colour": drawings["colour"], "shape": drawings["shape"]}[key]
        print(f"{key}: {got:.1%} (target {target:.0%}) {'met' if got >= target else 'MISSED'}")


if __name__ == "__main__":
    main()
