"""The compositional scorer: generated images of shapes prompts -> prompt-following accuracies.

Each image is read back with `lidit_jax.data.shapes.detect` (per slot of the layout: nearest
palette colour of the slot's foreground, the rendered shape and size mask of highest IoU, or
nothing) and compared with its prompt's ground truth (the record's metadata). What a caption
says about place depends on its template (`placement`):

  slots   "a red circle on the left, ..." (slot listings): each object has a named slot
  order   "a red circle to the left of a blue square" (row relations): left-to-right order only
  none    "two small red circles" (counts): no place at all

Units (per prompt object o unless said):
    colour_accuracy     o's colour is drawn (matched one to one against the detections, so a
                        colour named twice must be drawn twice); place not considered
    shape_accuracy      likewise o's shape
    size_accuracy       likewise o's size
    object_accuracy     o's colour, shape and size together on one detected object
    position_accuracy   an object of o's colour where the caption put o: at o's slot (slots),
                        at o's rank in the detections' left-to-right order (order); objects of
                        count captions have no position unit
    empty_slot_accuracy per slot a slot-listing caption leaves empty: nothing drawn there (a
                        model painting every slot with the named colours scores 0)
  per image:
    count_accuracy      the number of detected objects equals the prompt's
    prompt_accuracy     the caption fully satisfied: slots: every slot right (each object exact,
                        each empty slot empty); order: the detections left to right are the
                        objects in order; none: the detections are the objects

`by_objects` repeats every metric per object count (1, 2, ... objects in the prompt), and
`per_image` keeps each image's hits and units per metric, so two runs scored on the same prompts
can be compared pair by pair. The positional-bias probe (the paper's Fig. 3) buckets
object_accuracy by the object's mention rank in the caption (1st, 2nd, ... noun phrase, from the
metadata's word indices; a count phrase such as "two red circles" is one mention). Every accuracy
carries a 95 % Wilson interval over its units.

`by_mention` alone confounds rank with slot and object count (rank 4 only exists in 4-object
prompts, and where captions list objects in slot order rank 1 is the top-left slot). `rank_slope`
separates them: over the objects of slot captions, a logistic model of object_accuracy on
mention rank with slot and object count as covariates (readout_stats.design, as the text-only
readout fits it); the rank coefficient (log-odds per later mention, 0: no positional bias) with a
bootstrap interval over images. It is None where no caption mentions its objects in another order
than slot order (the "row" and "grid" captioners): rank then cannot be told from slot; the
"grid_late" layout draws mention order independently of slot.
"""
import collections
import math

import numpy as np

from lidit_jax.data import shapes
from lidit_jax.evaluate import readout_stats

METRICS = ("prompt_accuracy", "colour_accuracy", "shape_accuracy", "size_accuracy",
           "position_accuracy", "object_accuracy", "count_accuracy", "empty_slot_accuracy")
_ATTRIBUTES = {"colour": (0,), "shape": (1,), "size": (2,), "object": (0, 1, 2)}


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


def placement(metadata):
    """What the caption says about place: "slots", "order" or "none" (see the module doc)."""
    template = metadata.get("template", 0)
    layout = shapes.layout_of(metadata.get("layout", "row"))
    if template == 1:
        return "none"
    if template == 2 and len(metadata["objects"]) > 1 and layout.rows == 1:
        return "order"
    return "slots"  # Listings, and relation captions that fall back to a listing.


def _matched(wanted, drawn):
    """Per wanted key, whether it is matched one to one by a drawn key (multiset intersection,
    first come first served among equal keys)."""
    available = collections.Counter(drawn)
    hits = []
    for key in wanted:
        hits.append(available[key] > 0)
        available[key] -= 1
    return hits


def judge(detection, metadata):
    """One image's detection (shapes.detect output) vs its metadata -> per-unit booleans.

    Returns {"objects": [dict(colour, shape, size, object, rank, position (None for count
    captions)) per prompt object], "empty_slots": [bool per slot the caption leaves empty],
    "count": bool, "prompt": bool}.
    """
    slots = shapes.layout_of(metadata.get("layout", "row")).slots
    objects = metadata["objects"]
    truths = [(o["colour"], o["shape"], o["size"]) for o in objects]
    drawn = [d for d in detection if d is not None]
    judged = [{"rank": rank} for rank in mention_ranks(objects)]
    for name, fields in _ATTRIBUTES.items():
        pick = lambda item: tuple(item[i] for i in fields)  # noqa: E731
        for unit, hit in zip(judged, _matched([pick(t) for t in truths], [pick(d) for d in drawn])):
            unit[name] = hit
    place = placement(metadata)
    expected = shapes.expected_detection(metadata)
    empty_slots = []
    if place == "slots":
        for unit, obj in zip(judged, objects):
            found = detection[slots.index(obj["slot"])]
            unit["position"] = found is not None and found[0] == obj["colour"]
        empty_slots = [found is None for found, want in zip(detection, expected) if want is None]
        prompt = list(detection) == expected
    elif place == "order":
        in_order = [t for t in expected if t is not None]  # Objects left to right.
        by_slot = sorted(range(len(objects)), key=lambda k: slots.index(objects[k]["slot"]))
        for rank, k in enumerate(by_slot):
            judged[k]["position"] = rank < len(drawn) and drawn[rank][0] == truths[k][0]
        prompt = drawn == in_order
    else:
        for unit in judged:
            unit["position"] = None
        prompt = sorted(drawn) == sorted(truths)
    return {"objects": judged, "empty_slots": empty_slots, "count": len(drawn) == len(objects),
            "prompt": prompt}


def _image_units(judgement):
    """One judged image -> {metric: list of unit booleans}."""
    objects = judgement["objects"]
    units = {"prompt_accuracy": [judgement["prompt"]], "count_accuracy": [judgement["count"]],
             "empty_slot_accuracy": judgement["empty_slots"],
             "position_accuracy": [o["position"] for o in objects if o["position"] is not None]}
    for name in ("colour", "shape", "size", "object"):
        units[f"{name}_accuracy"] = [o[name] for o in objects]
    return units


def _summarise(per_image):
    """[{metric: unit booleans}] -> {metric, metric_ci95, num_images, num_objects}."""
    out = {"num_images": len(per_image),
           "num_objects": sum(len(units["colour_accuracy"]) for units in per_image)}
    for name in METRICS:
        values = [v for units in per_image for v in units[name]]
        out[name] = float(np.mean(values)) if values else 0.0
        out[f"{name}_ci95"] = list(wilson_interval(sum(values), len(values)))
        out[f"{name}_units"] = len(values)
    return out


def score(images, metadatas):
    """images: [N, S, S, 3] (uint8, or float in [-1, 1]); metadatas: N shapes metadata dicts.

    Returns a JSON-ready dict: each of METRICS, its interval "<metric>_ci95" [low, high] and
    unit count "<metric>_units", "num_images", "num_objects"; "by_objects": {"1": the same for
    one-object prompts, "2": ...}; "per_image": [{metric: [hits, units]}] in prompt order
    (an image's colour units are its prompt's objects); and
    "by_mention": [{"rank", "accuracy", "ci95", "num"}] for mention ranks 1, 2, ...
    (object_accuracy of the objects mentioned k-th).
    """
    if len(images) != len(metadatas):
        raise ValueError(f"{len(images)} images but {len(metadatas)} metadata entries")
    judged = [judge(shapes.detect(image, m.get("layout", "row")), m)
              for image, m in zip(images, metadatas)]
    per_image = [_image_units(j) for j in judged]
    out = _summarise(per_image)
    counts = sorted({len(m["objects"]) for m in metadatas})
    out["by_objects"] = {str(n): _summarise([u for u, m in zip(per_image, metadatas)
                                             if len(m["objects"]) == n]) for n in counts}
    out["per_image"] = [{name: [int(sum(units[name])), len(units[name])] for name in METRICS}
                        for units in per_image]
    objects = [o for j in judged for o in j["objects"]]
    by_mention = []
    for rank in sorted({o["rank"] for o in objects}):
        hits = [o["object"] for o in objects if o["rank"] == rank]
        by_mention.append({"rank": rank + 1, "accuracy": float(np.mean(hits)),
                           "ci95": list(wilson_interval(sum(hits), len(hits))),
                           "num": len(hits)})
    out["by_mention"] = by_mention
    out["rank_slope"] = rank_slope(judged, metadatas)
    return out


RANK_SAMPLES = 500  # Bootstrap samples of rank_slope's interval.


def rank_slope(judged, metadatas, *, samples=RANK_SAMPLES, seed=0):
    """The positional-bias model (module doc) over the objects of slot captions -> {"slope",
    "ci95", "num"}; slope and ci95 None where every caption mentions its objects in slot
    order."""
    rows, shuffled = [], False
    for image, (judgement, metadata) in enumerate(zip(judged, metadatas)):
        if placement(metadata) != "slots":
            continue
        slots = shapes.layout_of(metadata.get("layout", "row")).slots
        objects = metadata["objects"]
        by_rank = sorted(range(len(objects)), key=lambda k: judgement["objects"][k]["rank"])
        slot_indices = [slots.index(o["slot"]) for o in objects]
        shuffled |= [slot_indices[k] for k in by_rank] != sorted(slot_indices)
        rows += [(image, judgement["objects"][k]["rank"], slot_indices[k], len(objects),
                  judgement["objects"][k]["object"]) for k in range(len(objects))]
    if not shuffled:
        return {"slope": None, "ci95": None, "num": len(rows)}
    image, rank, slot, count, hit = (np.array(column) for column in zip(*rows))
    num_slots = max(len(shapes.layout_of(m.get("layout", "row")).slots) for m in metadatas)
    x = readout_stats.design(rank, slot, count, num_slots)
    hit = hit.astype(np.float64)

    def fit(weights):
        keep = weights > 0
        return float(readout_stats.logistic_fit(x[keep], (hit * weights)[keep],
                                                weights[keep])[1])

    images = np.unique(image)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):  # Resample images (an image's objects share its noise).
        per_image = np.bincount(rng.choice(images, len(images)), minlength=image.max() + 1)
        draws.append(fit(per_image[image].astype(np.float64)))
    return {"slope": fit(np.ones(len(rows))), "num": len(rows),
            "ci95": [float(v) for v in np.percentile(draws, [2.5, 97.5])]}


def markdown_table(scores):
    """scores (from `score`) -> a markdown table: metric, value, 95 % interval, units."""
    lines = ["| metric | value | 95 % interval | units |", "|---|---|---|---|"]
    for name in METRICS:
        low, high = scores[f"{name}_ci95"]
        units = scores[f"{name}_units"]
        lines.append(f"| {name} | {scores[name]:.3f} | [{low:.3f}, {high:.3f}] | {units} |")
    lines += ["", "| objects in prompt | images | colour | shape | position | object | prompt |",
              "|---|---|---|---|---|---|---|"]
    for count, part in scores["by_objects"].items():
        lines.append(f"| {count} | {part['num_images']} | " + " | ".join(
            f"{part[f'{name}_accuracy']:.3f}"
            for name in ("colour", "shape", "position", "object", "prompt")) + " |")
    lines += ["", "| mention rank | object accuracy | 95 % interval | objects |", "|---|---|---|---|"]
    for row in scores["by_mention"]:
        lines.append(f"| {row['rank']} | {row['accuracy']:.3f} | "
                     f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] | {row['num']} |")
    return "\n".join(lines) + "\n"
