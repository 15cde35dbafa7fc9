"""Captions of 2x2-grid scenes whose every slot's truth is known, in six constructions.

The readout benchmark (readout.py) asks: from the text states alone, which object sits in each
of the four slots (top left, top right, bottom left, bottom right)? The constructions differ in
WHERE in the caption a slot is bound to its object, which is what separates causal from
bidirectional encoders:

  pre_binding     "in the top left, a large red circle and in the bottom right, a small blue
                  square": the slot comes first, every object word can know its slot.
  post_binding    "a large red circle in the top left and a small blue square in the bottom
                  right": the slot follows its object.
  late_override   "a large red circle and a small blue square, in the bottom right and top left
                  respectively": no object is placed until the last words.
  order_flip      minimal pairs "a large red circle and a small blue square in the top row,
                  from left to right" / "..., from right to left": the last words move both.
  attribute_swap  minimal pairs whose two objects trade colours, same slots and phrasing.
  many            all four slots filled (post-binding).

In pre_binding, post_binding and many, the mention order is a random permutation of the
objects, drawn independently of their slots, so mention rank is not confounded with slot (the
positional-bias model in readout_stats.py has slot and object count as covariates).

An `Item` carries its caption, per-slot truth and `group`: the two captions of a minimal pair
share a group, which is the unit the bootstrap resamples. `make_split` draws the test set
first (deduplicated by (construction, scene)), then training items whose scenes (of both
members, for pairs) never occur in the test set.
"""
import dataclasses

import numpy as np

from lidit_jax.data import shapes

CONSTRUCTIONS = ("pre_binding", "post_binding", "late_override", "order_flip", "attribute_swap",
                 "many")
# Constructions whose mention order is drawn independently of slot (positional-bias curve).
RANDOM_ORDER = ("pre_binding", "post_binding", "many")
GRID = shapes.layout_of("grid")
NUM_SLOTS = len(GRID.slots)
EMPTY = len(shapes.COLOUR_NAMES)  # Colour class of an empty slot.
CLASSES = {"colour": len(shapes.COLOUR_NAMES) + 1, "shape": len(shapes.SHAPES),
           "size": len(shapes.SIZES)}  # Per-slot heads of the `slots` readout and their classes.
# Per-mention heads of the `mentions` readout: the object's slot and its own attributes.
MENTION_CLASSES = {"slot": NUM_SLOTS, "colour": len(shapes.COLOUR_NAMES),
                   "shape": len(shapes.SHAPES), "size": len(shapes.SIZES)}
HEADS = {"slots": CLASSES, "mentions": MENTION_CLASSES}  # The two readouts (readout.py).
# Row / column of the grid -> its two slots in reading order, and the two orders' phrases.
LINES = {"top row": (0, 1), "bottom row": (2, 3), "left column": (0, 2), "right column": (1, 3)}
DIRECTIONS = {"row": ("from left to right", "from right to left"),
              "column": ("from top to bottom", "from bottom to top")}


@dataclasses.dataclass(frozen=True)
class Item:
    """caption; slots: NUM_SLOTS entries, None or (colour, shape, size) names; mentions: slot
    index of each object in mention order; group: shared by a minimal pair's two captions."""
    caption: str
    construction: str
    slots: tuple
    mentions: tuple
    group: int

    def targets(self):
        """-> {head: [NUM_SLOTS] class}: colour (EMPTY when empty), shape, size (-1 when empty)."""
        return {"colour": np.array([EMPTY if s is None else shapes.COLOUR_NAMES.index(s[0])
                                    for s in self.slots]),
                "shape": np.array([-1 if s is None else shapes.SHAPES.index(s[1])
                                   for s in self.slots]),
                "size": np.array([-1 if s is None else shapes.SIZES.index(s[2])
                                  for s in self.slots])}

    def mention_targets(self):
        """-> {head: [NUM_SLOTS] class} per mention, in mention order (MENTION_CLASSES: slot,
        colour, shape, size); -1 after the last mention."""
        out = {head: np.full(NUM_SLOTS, -1) for head in MENTION_CLASSES}
        for rank, slot in enumerate(self.mentions):
            colour, shape, size = self.slots[slot]
            out["slot"][rank] = slot
            out["colour"][rank] = shapes.COLOUR_NAMES.index(colour)
            out["shape"][rank] = shapes.SHAPES.index(shape)
            out["size"][rank] = shapes.SIZES.index(size)
        return out

    def spans(self):
        """Character [start, stop) of each mention's noun phrase ("a large red circle") in the
        caption, in mention order: the tokens the `mentions` readout may read for it. Every
        construction writes its objects in mention order, so each is found after the last."""
        out, cursor = [], 0
        for slot in self.mentions:
            words = _words(self.slots[slot])
            start = self.caption.index(words, cursor)
            cursor = start + len(words)
            out.append((start, cursor))
        return out


def targets_of(items, readout="slots"):
    """-> {head: [len(items), NUM_SLOTS]}: Item.targets (readout "slots") or
    Item.mention_targets ("mentions") stacked."""
    per_item = [item.targets() if readout == "slots" else item.mention_targets()
                for item in items]
    return {head: np.stack([t[head] for t in per_item]) for head in HEADS[readout]}


def _object(rng, colour=None):
    return (colour or shapes.COLOUR_NAMES[rng.integers(len(shapes.COLOUR_NAMES))],
            shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
            shapes.SIZES[rng.integers(len(shapes.SIZES))])


def _words(obj):
    colour, shape, size = obj
    return f"a {size} {colour} {shape}"


def _listing(parts):
    """["x"] -> "x"; ["x", "y"] -> "x and y"; ["x", "y", "z"] -> "x, y and z"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _scene(placed):
    """{slot index: object} -> the slots tuple."""
    return tuple(placed.get(i) for i in range(NUM_SLOTS))


def _placed(rng, count):
    """count objects at distinct random slots, in a random mention order: [(slot, object)]."""
    slots = rng.choice(NUM_SLOTS, size=count, replace=False).tolist()
    return [(slot, _object(rng)) for slot in slots]


def _binding(rng, construction, group, count):
    placed = _placed(rng, count)
    if construction == "pre_binding":
        parts = [f"{GRID.phrases[slot]}, {_words(obj)}" for slot, obj in placed]
    else:
        parts = [f"{_words(obj)} {GRID.phrases[slot]}" for slot, obj in placed]
    return [Item(_listing(parts), construction, _scene(dict(placed)),
                 tuple(s for s, _ in placed), group)]


def _late_override(rng, group):
    placed = _placed(rng, int(rng.integers(2, NUM_SLOTS + 1)))
    caption = (_listing([_words(obj) for _, obj in placed]) + ", in the "
               + _listing([GRID.slots[slot] for slot, _ in placed]) + " respectively")
    return [Item(caption, "late_override", _scene(dict(placed)), tuple(s for s, _ in placed),
                 group)]


def _order_flip(rng, group):
    line = list(LINES)[rng.integers(len(LINES))]
    first, second = _object(rng), _object(rng)
    items = []
    for flipped, direction in enumerate(DIRECTIONS[line.split()[1]]):
        slots = LINES[line][::-1] if flipped else LINES[line]
        caption = f"{_words(first)} and {_words(second)} in the {line}, {direction}"
        items.append(Item(caption, "order_flip", _scene({slots[0]: first, slots[1]: second}),
                          slots, group))
    return items


def _attribute_swap(rng, group):
    colours = rng.choice(len(shapes.COLOUR_NAMES), size=2, replace=False)
    (slot_a, a), (slot_b, b) = _placed(rng, 2)
    items = []
    for swap in (False, True):
        ca, cb = (shapes.COLOUR_NAMES[c] for c in (colours[::-1] if swap else colours))
        objects = {slot_a: (ca, *a[1:]), slot_b: (cb, *b[1:])}
        caption = _listing([f"{_words(objects[s])} {GRID.phrases[s]}" for s in (slot_a, slot_b)])
        items.append(Item(caption, "attribute_swap", _scene(objects), (slot_a, slot_b), group))
    return items


def generate(rng, construction, group):
    """One draw of a construction: [Item] (two for the minimal-pair constructions)."""
    if construction in ("pre_binding", "post_binding"):
        return _binding(rng, construction, group, int(rng.integers(1, NUM_SLOTS + 1)))
    if construction == "many":
        return [dataclasses.replace(item, construction="many")
                for item in _binding(rng, "post_binding", group, NUM_SLOTS)]
    if construction == "late_override":
        return _late_override(rng, group)
    if construction == "order_flip":
        return _order_flip(rng, group)
    if construction == "attribute_swap":
        return _attribute_swap(rng, group)
    raise ValueError(f"unknown construction {construction!r}; known: {CONSTRUCTIONS}")


def make_split(num_train, num_test_groups, seed=0):
    """-> (train items, test items). The test set has `num_test_groups` draws per construction,
    none repeating a (construction, scene); training items (about num_train captions, spread
    evenly over the constructions) never show a scene of the test set."""
    rng = np.random.default_rng(seed)
    test, seen, group = [], set(), 0
    for construction in CONSTRUCTIONS:
        made = 0
        while made < num_test_groups:
            items = generate(rng, construction, group)
            keys = {(construction, i.slots) for i in items}
            # A pair of one scene (an order flip of two identical objects) tests nothing.
            if keys & seen or len(keys) < len(items):
                continue
            seen |= keys
            test.extend(items)
            group, made = group + 1, made + 1
    test_scenes = {i.slots for i in test}
    train = []
    per_construction = -(-num_train // len(CONSTRUCTIONS))
    for construction in CONSTRUCTIONS:
        made = 0
        while made < per_construction:
            items = generate(rng, construction, group)
            if any(i.slots in test_scenes for i in items):
                continue
            train.extend(items)
            group, made = group + 1, made + len(items)
    return train, test
