"""The demo's classes: a shape drawn in a colour with a texture, and their LVIS frequency groups."""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "diamond", "hexagon", "crescent", "arrow",
)  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 185),
    "orange": (245, 130, 25),
    "cyan": (35, 195, 205),
    "white": (240, 240, 240),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted")


@dataclass(frozen=True)
class Category:
    """One demo class: a shape drawn in a colour with a texture."""

    id: int
    shape: str
    colour: str
    texture: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


def demo_categories() -> list[Category]:
    """The 40 demo classes (ids 1..40): every (shape, texture) pair once, colours spread evenly.

    ``colour = (shape + 3 * texture) mod 8`` gives each colour 5 classes and each shape 4 different
    colours, so colour, shape and texture are each shared between classes.
    """
    names = list(COLOURS)
    cats = []
    for t, texture in enumerate(TEXTURES):
        for s, shape in enumerate(SHAPES):
            colour = names[(s + 3 * t) % len(names)]
            cats.append(Category(len(cats) + 1, shape, colour, texture))
    return cats


def frequency_thresholds(num_train: int) -> tuple[int, int]:
    """(rare_max, common_max) train-image counts: LVIS's 10/100 at 600 train images, scaled."""
    rare_max = max(1, round(10 * num_train / 600))
    common_max = max(rare_max + 1, round(100 * num_train / 600))
    return rare_max, common_max


def frequency_of(image_count: int, num_train: int) -> str:
    """LVIS frequency letter ('r', 'c', 'f') for a class seen in ``image_count`` train images."""
    rare_max, common_max = frequency_thresholds(num_train)
    if image_count <= rare_max:
        return "r"
    return "c" if image_count <= common_max else "f"
