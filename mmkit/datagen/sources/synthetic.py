"""The synthetic world's scenes as a source: the images are rendered, and each scene's view
(five captions drawn from its generator, and its objects' boxes) is what the teacher is shown."""
from __future__ import annotations

import random
import sys
from pathlib import Path

from tqdm import tqdm

from mmkit.core.registry import SOURCES
from mmkit.datagen.source import AnnotatedImage, AnnotationSource, View
from mmkit.synth.llava_data import image_name, save_image
from mmkit.synth.world import COLOURS, SHAPES, generate_scenes, symbolic_view


@SOURCES.register("synthetic")
class SyntheticSource(AnnotationSource):
    unit = "scene"
    # A smaller count gives a prefix of a larger one, so a larger count extends a folder; the seed
    # is the run's own --seed, which a folder's identity holds already.
    operational_options = frozenset({"count", "images", "seed"})

    def __init__(self, images: str, count: int, split: str = "train", seed: int = 0, resolution: int = 64) -> None:
        self.split, self.seed, self.resolution = split, seed, resolution
        self._image_root = Path(images)
        self._scenes = generate_scenes(split, count, seed)  # checks the split and the count

    @property
    def image_root(self) -> Path:
        return self._image_root

    @property
    def output_name(self) -> str:
        return f"{self.split}.json"

    def images(self) -> list[AnnotatedImage]:
        return [AnnotatedImage(id=scene.scene_id, image=image_name(scene), annotation=scene) for scene in self._scenes]

    def view(self, image: AnnotatedImage, rng: random.Random) -> View:
        return symbolic_view(image.annotation, rng)

    def vocabulary(self) -> list[str]:
        return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

    def describe(self) -> str:
        return f"synthetic ({self.split} split)"

    def prepare(self, images: list[AnnotatedImage], out: Path, progress: bool) -> None:
        """Render the scenes whose images are not there yet (all of them on a first run)."""
        self.image_root.mkdir(parents=True, exist_ok=True)
        for leftover in self.image_root.glob(".*.partial-*"):  # an image a killed run was saving
            leftover.unlink(missing_ok=True)
        missing = [image for image in images if not (self.image_root / image.image).is_file()]
        for image in tqdm(missing, desc="rendering scenes", unit="scene", disable=not progress or not missing,
                          file=sys.stderr):
            save_image(image.annotation, self.image_root, self.resolution)
