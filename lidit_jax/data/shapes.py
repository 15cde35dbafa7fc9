"""A compositional shapes data set: rendered on the fly, with exact ground truth.

Each image (image_size px square, default 32, 32..64 supported) has a solid dark grey background
and objects, each in its own slot of a layout: "row" (default) has 1-3 objects in the left /
middle / right thirds, "grid" 1-4 in the quadrants (top left, top right, bottom left, bottom
right). An object has a colour (8), a shape (5) and a size (small / large). Captions list the
objects in one of several templates (slot listing, counts such as "two small yellow triangles",
left-of relations in the row layout); the metadata records the layout and per object its colour,
shape, size, slot and the word index of its shape noun in `caption.split()`.
"grid_late" is the grid with a balanced design for the generative ablation (configs/generative):
record i has 1 + i % 4 objects of distinct colours, mentioned in random order, and alternates
(by i // 4) the slot listing with a late-binding template whose slots all come after the
objects ("a red circle and a blue square, in the bottom right and top left respectively"), so
any 8 consecutive records hold each (object count, template) once.

Record i is a pure function of (seed, i): `ShapesSource(num_records, seed, image_size, layout)[i]`
renders it without files (Grain's RandomAccessDataSource protocol). `detect(image, layout)`
recovers the objects from pixels (nearest palette colour of the slot's foreground, nearest
rendered shape mask by IoU): used to check the ground truth and to score generated images.

CLI: python -m lidit_jax.data.shapes --output=DIR --num=N [--seed=S] [--image_size=32]
[--layout=row] writes ArrayRecord shards (lidit_jax.data.records format, PNG images).
"""
import dataclasses
import functools

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 80, 240),
    "yellow": (240, 220, 30), "purple": (150, 50, 200), "orange": (250, 140, 20),
    "white": (245, 245, 245), "cyan": (30, 210, 220),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)  # [8, 3]
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = ("small", "large")
_NUMBERS = {2: "two", 3: "three", 4: "four"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Slots on a columns x rows grid of equal cells, in reading order, with caption phrases.

    templates: the caption templates records use (see `caption_for`); balanced: scenes and
    templates follow the record index (the "grid_late" design in the module doc) instead of
    random draws.
    """
    columns: int
    rows: int
    slots: tuple
    phrases: tuple
    templates: tuple = (0, 1, 2)
    balanced: bool = False

    def cell(self, slot_index):
        """(column, row) of a slot."""
        return slot_index % self.columns, slot_index // self.columns


LAYOUTS = {
    "row": Layout(3, 1, ("left", "middle", "right"),
                  ("on the left", "in the middle", "on the right")),
    "grid": Layout(2, 2, ("top left", "top right", "bottom left", "bottom right"),
                   ("in the top left", "in the top right", "in the bottom left",
                    "in the bottom right")),
}
LAYOUTS["grid_late"] = dataclasses.replace(LAYOUTS["grid"], templates=(0, 3), balanced=True)


def layout_of(name):
    if name not in LAYOUTS:
        raise ValueError(f"shapes layout {name!r}; choose one of {tuple(LAYOUTS)}")
    return LAYOUTS[name]


_PREFIXES = ("", "a picture of ", "an image of ", "a drawing with ")
_RADIUS = {"small": 0.3, "large": 0.45}  # Fraction of the cell width.
_BACKGROUND_LEVELS = (20, 70)  # Grey level range of the background.
# A pixel is foreground when a channel differs from the background by more than this.
_FOREGROUND_THRESHOLD = 40.0
# Background candidates: pixels whose channels differ by less than this (grey, noise allowed).
_GREY_SPREAD = 48.0


def _unit_mask(shape, u, v):
    """Shape in unit coordinates (u right, v down; radius 1) -> bool mask."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":  # Apex up.
        return (v <= 0.85) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "cross":
        arm = 0.36
        return (((np.abs(u) <= arm) & (np.abs(v) <= 1.0))
                | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0)))
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


@functools.lru_cache(maxsize=8)
def masks(image_size, layout="row"):
    """Rendered masks: bool [slots, 5 shapes, 2 sizes, image_size, image_size]."""
    if not 32 <= image_size <= 64:
        raise ValueError(f"shapes image_size must be in [32, 64], got {image_size}")
    grid = layout_of(layout)
    cell_width, cell_height = image_size / float(grid.columns), image_size / float(grid.rows)
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    out = np.zeros((len(grid.slots), len(SHAPES), len(SIZES), image_size, image_size), bool)
    for slot in range(len(grid.slots)):
        column, row = grid.cell(slot)
        cx, cy = (column + 0.5) * cell_width, (row + 0.5) * cell_height
        for size_index, size in enumerate(SIZES):
            radius = _RADIUS[size] * cell_width
            for shape_index, shape in enumerate(SHAPES):
                out[slot, shape_index, size_index] = _unit_mask(
                    shape, (x - cx) / radius, (y - cy) / radius)
    out.setflags(write=False)
    return out


def sample_objects(rng, layout="row"):
    """Random scene: list of dicts (colour, shape, size, slot) in slot order."""
    slot_names = layout_of(layout).slots
    count = int(rng.integers(1, len(slot_names) + 1))
    slots = sorted(rng.choice(len(slot_names), size=count, replace=False).tolist())
    objects = []
    for slot in slots:
        if objects and rng.random() < 0.3:  # Repeats make count captions ("two red circles").
            obj = dict(objects[-1])
        else:
            obj = {"colour": COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                   "shape": SHAPES[rng.integers(len(SHAPES))],
                   "size": SIZES[rng.integers(len(SIZES))]}
        obj["slot"] = slot_names[slot]
        objects.append(obj)
    return objects


def balanced_objects(rng, index, layout):
    """The balanced design's scene for record `index`: 1 + index % 4 objects (at most one per
    slot) of distinct colours, in random mention order (independent of slot order)."""
    slot_names = layout_of(layout).slots
    count = 1 + index % len(slot_names)
    slots = rng.choice(len(slot_names), size=count, replace=False)
    colours = rng.choice(len(COLOUR_NAMES), size=count, replace=False)
    return [{"colour": COLOUR_NAMES[colour], "shape": SHAPES[rng.integers(len(SHAPES))],
             "size": SIZES[rng.integers(len(SIZES))], "slot": slot_names[slot]}
            for slot, colour in zip(slots.tolist(), colours.tolist())]


def render(objects, background, image_size=32, layout="row"):
    """Objects (dicts with colour, shape, size, slot) -> uint8 [image_size, image_size, 3]."""
    image = np.full((image_size, image_size, 3), background, np.uint8)
    all_masks = masks(image_size, layout)
    slot_names = layout_of(layout).slots
    for obj in objects:
        mask = all_masks[slot_names.index(obj["slot"]), SHAPES.index(obj["shape"]),
                         SIZES.index(obj["size"])]
        image[mask] = COLOURS[obj["colour"]]
    return image


class _Words:
    """Builds a caption word by word, remembering where each object's shape noun lands."""

    def __init__(self, prefix):
        self.words = prefix.split()

    def add(self, text):
        self.words.extend(text.split())

    def noun(self, obj, count=1):
        """Adds '[a|two|three] size colour shape[s]'; returns the shape noun's word index."""
        article = "a" if count == 1 else _NUMBERS[count]
        noun = obj["shape"]
        if count > 1:
            noun += "es" if noun == "cross" else "s"
        self.add(f"{article} {obj['size']} {obj['colour']} {noun}")
        return len(self.words) - 1

    def text(self):
        return " ".join(self.words)


def _join(words, parts):
    """Adds parts (callables adding words) joined as 'x', 'x and y', 'x, y and z'."""
    for k, part in enumerate(parts):
        if k > 0:
            words.words[-1] += "," if k < len(parts) - 1 else ""
            if k == len(parts) - 1:
                words.add("and")
        part()


def caption_for(objects, template, prefix="", layout="row"):
    """(caption, word indices of each object's shape noun) for objects in slot order.

    template 0: slot listing; 1: counts of identical objects; 2: left-of relations (falls back to
    the slot listing for a single object, and in the grid layout, whose slot order is not
    left to right); 3: late binding, every object first, then the slots in mention order
    ("a red circle and a blue square, in the bottom right and top left respectively"; one
    object: "a red circle, in the top left").
    """
    grid = layout_of(layout)
    words = _Words(prefix)
    positions = [None] * len(objects)
    if template == 2 and len(objects) > 1 and grid.rows == 1:
        for k, obj in enumerate(objects):
            if k == 1:
                words.add("to the left of")
            elif k == 2:
                words.words[-1] += ","
                words.add("which is to the left of")
            positions[k] = words.noun(obj)
    elif template == 3:
        def add_noun(k):
            positions[k] = words.noun(objects[k])
        _join(words, [functools.partial(add_noun, k) for k in range(len(objects))])
        words.words[-1] += ","
        slot_list = _Words("in the")
        _join(slot_list, [functools.partial(slot_list.add, obj["slot"]) for obj in objects])
        words.add(slot_list.text())
        if len(objects) > 1:
            words.add("respectively")
    elif template == 1:
        groups = {}
        for k, obj in enumerate(objects):
            groups.setdefault((obj["size"], obj["colour"], obj["shape"]), []).append(k)

        def add_group(members):
            index = words.noun(objects[members[0]], len(members))
            for k in members:
                positions[k] = index
        _join(words, [functools.partial(add_group, members) for members in groups.values()])
    else:
        def add_object(k):
            positions[k] = words.noun(objects[k])
            words.add(grid.phrases[grid.slots.index(objects[k]["slot"])])
        _join(words, [functools.partial(add_object, k) for k in range(len(objects))])
    return words.text(), positions


def make_record(index, seed=0, image_size=32, layout="row"):
    """Record `index` of the set with `seed`: dict(image uint8 [S, S, 3], caption, metadata)."""
    rng = np.random.default_rng([seed, index])
    grid = layout_of(layout)
    objects = (balanced_objects(rng, index, layout) if grid.balanced
               else sample_objects(rng, layout))
    background = int(rng.integers(*_BACKGROUND_LEVELS))
    if grid.balanced:
        template = grid.templates[(index // len(grid.slots)) % len(grid.templates)]
    else:  # Drawn after the background, as before the balanced design: the same records.
        template = grid.templates[int(rng.integers(len(grid.templates)))]
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    caption, positions = caption_for(objects, template, prefix, layout)
    for obj, position in zip(objects, positions):
        obj["word_index"] = position
    return {"image": render(objects, background, image_size, layout), "caption": caption,
            "metadata": {"objects": objects, "background": background, "template": template,
                         "layout": layout, "shapes_seed": seed, "shapes_index": index}}


class ShapesSource:
    """Random-access shapes records (len, [i]); no files, record i = f(seed, i)."""

    def __init__(self, num_records, seed=0, image_size=32, layout="row"):
        masks(image_size, layout)  # Validates image_size and layout early.
        self.num_records, self.seed, self.image_size = int(num_records), int(seed), int(image_size)
        self.layout = layout

    def __len__(self):
        return self.num_records

    def __getitem__(self, index):
        if not 0 <= index < self.num_records:
            raise IndexError(f"shapes record {index} outside [0, {self.num_records})")
        return make_record(int(index), self.seed, self.image_size, self.layout)

    def caption(self, index):
        return self[index]["caption"]

    def __repr__(self):
        return (f"ShapesSource(num_records={self.num_records}, seed={self.seed}, "
                f"image_size={self.image_size}, layout={self.layout!r})")


def detect(image, layout="row"):
    """Recovers objects from pixels: list (per slot of `layout`) of (colour, shape, size) or None.

    image: [S, S, 3] uint8 in [0, 255] or float in [-1, 1]. The background is the median of the
    image's dark grey pixels (no palette colour is dark grey; four large objects can cover most
    of a grid image, so the median of all pixels would not do); a slot's foreground is where a
    channel departs from it by more than a threshold. The colour is the palette entry nearest
    the foreground mean, the shape and size those of the rendered mask with the highest IoU.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, -1.0, 1.0) + 1.0) * 127.5
    image = image.astype(np.float32)
    size = image.shape[0]
    if image.shape != (size, size, 3):
        raise ValueError(f"detect expects a square [S, S, 3] image, got {image.shape}")
    grey = ((image.max(-1) - image.min(-1) < _GREY_SPREAD)
            & (image.mean(-1) < _BACKGROUND_LEVELS[1] + _FOREGROUND_THRESHOLD))
    background = np.median(image[grey] if grey.any() else image.reshape(-1, 3), axis=0)
    foreground = np.abs(image - background).max(-1) > _FOREGROUND_THRESHOLD
    all_masks = masks(size, layout)
    grid = layout_of(layout)
    results = []
    x_bounds = np.round(np.arange(grid.columns + 1) * size / grid.columns).astype(int)
    y_bounds = np.round(np.arange(grid.rows + 1) * size / grid.rows).astype(int)
    for slot in range(len(grid.slots)):
        column, row = grid.cell(slot)
        region = np.zeros_like(foreground)
        region[y_bounds[row]:y_bounds[row + 1], x_bounds[column]:x_bounds[column + 1]] = True
        found = foreground & region
        # Below a third of the smallest object: nothing there (noise specks).
        if found.sum() < all_masks[slot].sum(axis=(-1, -2)).min() / 3:
            results.append(None)
            continue
        colour = COLOUR_NAMES[int(np.argmin(((PALETTE - image[found].mean(0)) ** 2).sum(-1)))]
        candidates = all_masks[slot].reshape(-1, size, size) & region
        intersection = (candidates & found).sum(axis=(-1, -2))
        union = (candidates | found).sum(axis=(-1, -2))
        shape_index, size_index = divmod(int(np.argmax(intersection / union)), len(SIZES))
        results.append((colour, SHAPES[shape_index], SIZES[size_index]))
    return results


def expected_detection(metadata):
    """Ground-truth metadata -> the list detect(image, metadata["layout"]) should return."""
    slot_names = layout_of(metadata.get("layout", "row")).slots
    out = [None] * len(slot_names)
    for obj in metadata["objects"]:
        out[slot_names.index(obj["slot"])] = (obj["colour"], obj["shape"], obj["size"])
    return out


def main(argv):
    del argv
    from lidit_jax.data import records  # Only the CLI writes files.
    source = ShapesSource(FLAGS.num, FLAGS.seed, FLAGS.image_size, FLAGS.layout)

    def encode(index):
        record = source[index]
        return records.encode_record(records.encode_image(record["image"], "png"),
                                     record["caption"], record["metadata"], "png")
    written, skipped = records.write_records(FLAGS.output, len(source), encode,
                                             records_per_shard=FLAGS.records_per_shard)
    print(f"records={written} skipped={skipped}")


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("output", None, "output folder for ArrayRecord shards", required=True)
    flags.DEFINE_integer("num", 10000, "number of records")
    flags.DEFINE_integer("seed", 0, "data set seed (record i = f(seed, i))")
    flags.DEFINE_integer("image_size", 32, "image size in pixels, 32..64")
    flags.DEFINE_enum("layout", "row", list(LAYOUTS), "row: 1-3 objects; grid: 1-4 in quadrants")
    flags.DEFINE_integer("records_per_shard", 10000, "records per ArrayRecord shard")
    FLAGS = flags.FLAGS
    app.run(main)
