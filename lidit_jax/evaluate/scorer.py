"""The compositional scorer: generated images of shapes prompts -> prompt-following accuracies.

Each image is read back with `lidit_jax.data.shapes.detect` (per slot of the layout: nearest
palette colour of the slot's foreground, the rendered shape and size mask of highest IoU, or
nothing) and compared with its prompt's ground truth (the record's metadata). Units:

  per prompt object o, d = the detection at o's slot:
    colour_accuracy    d exists and has o's colour
    shape_accuracy     d exists and has o's shape
    size_accuracy      d exists and has o's size
    position_accuracy  d is o: its colour AND shape at the slot the prompt gave it (an object
                       drawn elsewhere, or two objects swapped, scores 0; GenEval's "position"
                       likewise needs the right object at the right place)
    object_accuracy    d equals o in colour, shape and size
  per image:
    count_accuracy     the number of detected objects equals the prompt's
    prompt_accuracy    every slot right: each object exact, each empty slot empty

The positional-bias probe (the paper's Fig. 3) buckets object_accuracy by the object's mention
rank in the caption (1st, 2nd, ... noun phrase, from the metadata's word indices; a count phrase
such as "two red circles" is one mention). Every accuracy carries a 95 % Wilson interval over its
units (objects or images).
"""
import math

import numpy as np

from lidit_jax.data import shapes

METRICS = ("prompt_accuracy", "colour_accuracy", "shape_accuracy", "size_accuracy",
           "position_accuracy", "object_accuracy", "count_accuracy")


def wilson_interval(successes, total, z=1.96):
    """95 % Wilson score interval (low, high) of a binomial proportion; (0, 1) when total=0."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mention_ranks(objects):
    """Objects (metadata dicts with word_index) -> 0-based mention rank of each in the caption."""
    order = sorted({obj["word_index"] for obj in objects})
    return [order.index(obj["word_index"]) for obj in objects]


def judge(detection, metadata):
    """One image's detection (shapes.detect output) vs its metadata -> per-unit booleans.

    Returns {"objects": [dict(colour, shape, size, position, object, rank) per prompt object],
             "count": bool, "prompt": bool}.
    """
    slots = shapes.layout_of(metadata.get("layout", "row")).slots
    objects = metadata["objects"]
    ranks = mention_ranks(objects)
    judged = []
    for obj, rank in zip(objects, ranks):
        found = detection[slots.index(obj["slot"])]
        colour, shape, size = found if found is not None else (None, None, None)
        judged.append({"colour": colour == obj["colour"], "shape": shape == obj["shape"],
                       "size": size == obj["size"],
                       "position": (colour, shape) == (obj["colour"], obj["shape"]),
                       "object": found == (obj["colour"], obj["shape"], obj["size"]),
                       "rank": rank})
    count = sum(d is not None for d in detection) == len(objects)
    return {"objects": judged, "count": count,
            "prompt": list(detection) == shapes.expected_detection(metadata)}


def score(images, metadatas):
    """images: [N, S, S, 3] (uint8, or float in [-1, 1]); metadatas: N shapes metadata dicts.

    Returns a JSON-ready dict: each of METRICS, its interval as "<metric>_ci95" [low, high],
    "num_images", "num_objects", and "by_mention": [{"rank", "accuracy", "ci95", "num"}] for
    mention ranks 1, 2, ... (object_accuracy of the objects mentioned k-th).
    """
    if len(images) != len(metadatas):
        raise ValueError(f"{len(images)} images but {len(metadatas)} metadata entries")
    judged = [judge(shapes.detect(image, m.get("layout", "row")), m)
              for image, m in zip(images, metadatas)]
    objects = [o for j in judged for o in j["objects"]]
    units = {"prompt_accuracy": [j["prompt"] for j in judged],
             "count_accuracy": [j["count"] for j in judged]}
    for name in ("colour", "shape", "size", "position", "object"):
        units[f"{name}_accuracy"] = [o[name] for o in objects]
    out = {"num_images": len(judged), "num_objects": len(objects)}
    for name in METRICS:
        values = units[name]
        out[name] = float(np.mean(values)) if values else 0.0
        out[f"{name}_ci95"] = list(wilson_interval(sum(values), len(values)))
    by_mention = []
    for rank in sorted({o["rank"] for o in objects}):
        hits = [o["object"] for o in objects if o["rank"] == rank]
        by_mention.append({"rank": rank + 1, "accuracy": float(np.mean(hits)),
                           "ci95": list(wilson_interval(sum(hits), len(hits))),
                           "num": len(hits)})
    out["by_mention"] = by_mention
    return out


def markdown_table(scores):
    """scores (from `score`) -> a markdown table: metric, value, 95 % interval, units."""
    lines = ["| metric | value | 95 % interval | units |", "|---|---|---|---|"]
    for name in METRICS:
        low, high = scores[f"{name}_ci95"]
        units = scores["num_images"] if name in ("prompt_accuracy", "count_accuracy") \
            else scores["num_objects"]
        lines.append(f"| {name} | {scores[name]:.3f} | [{low:.3f}, {high:.3f}] | {units} |")
    lines += ["", "| mention rank | object accuracy | 95 % interval | objects |", "|---|---|---|---|"]
    for row in scores["by_mention"]:
        lines.append(f"| {row['rank']} | {row['accuracy']:.3f} | "
                     f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] | {row['num']} |")
    return "\n".join(lines) + "\n"
