"""A small LLaVA-Bench-format set about held-out scenes of the synthetic world, so the judged
evaluation runs offline: one question per category per scene, reference answers by the
``rules`` teacher (exact facts), the scene's captions and boxes as the judge's context.

    python -m mmkit.synth.llava_bench_questions OUT_DIR --scenes 20
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mmkit.core.cache import build_once, cache_folder
from mmkit.datagen.teacher import build_teacher
from mmkit.synth.world import generate_scenes, render, symbolic_view

CATEGORY_OF = {"conversation": "conv", "detailed": "detail", "reasoning": "complex"}
DEFAULT_SCENES = 20


def write_llava_bench(out: Path, scenes: int = DEFAULT_SCENES, seed: int = 0, resolution: int = 64) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    teacher = build_teacher("rules", {})
    questions, contexts, references = [], [], []
    for scene in generate_scenes("test", scenes, seed=seed + 200):
        rng = random.Random(f"mmkit-llava-bench:{seed}:{scene.scene_id}")
        image = f"{scene.scene_id}.png"
        render(scene, resolution).save(out / "images" / image)
        view = symbolic_view(scene, rng)
        contexts.append({"image": image, "caption": view["captions"],
                         "instances": [{"category": o["category"], "bbox": o["bbox"]} for o in view["objects"]]})
        for written in teacher.write(view, rng):
            human, gpt = written.conversation[0], written.conversation[1]
            question_id = len(questions)
            questions.append({"question_id": question_id, "image": image, "category": CATEGORY_OF[written.type],
                              "text": human["value"].replace("<image>", "").strip()})
            references.append({"question_id": question_id, "text": gpt["value"], "answer_id": "rules"})
    for name, records in (("questions", questions), ("context", contexts), ("answers_gpt4", references)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def synthetic_llava_bench_dir(seed: int = 0, scenes: int = DEFAULT_SCENES) -> Path:
    folder = cache_folder("llava-bench-synthetic", {"seed": seed, "scenes": scenes, "version": 1})
    return build_once(folder, lambda out: write_llava_bench(out, scenes=scenes, seed=seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scenes", type=int, default=DEFAULT_SCENES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_llava_bench(args.out, args.scenes, args.seed)
    print(f"wrote {3 * args.scenes} questions about {args.scenes} scenes to {args.out}")


if __name__ == "__main__":
    main()
