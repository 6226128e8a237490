"""Sample answers during training: a fixed handful of held-out image questions answered every N
steps and at the end of each stage, so a run that learns nothing shows it in minutes.

The questions are the first items of an evaluation task (``sample_answers.task``, default the
first of ``evaluation.tasks``). Each round goes to ``<run>/sample_answers.md`` (image, question,
answer, reference, and the task's score on these items), and to the run's logger: a text table in
TensorBoard, a ``wandb.Table`` in Weights & Biases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch

from mmkit.evaluation.evaluator import EvalItem, Evaluator
from mmkit.inference.generation import AnswerGenerator

MARKDOWN = "sample_answers.md"
IMAGES = "sample_answers"


class SampleAnswers(L.Callback):
    def __init__(self, evaluator: Evaluator, items: Sequence[EvalItem], generator: Callable[[torch.nn.Module], AnswerGenerator],
                 run_dir: Path, stage: str, every_n_steps: int) -> None:
        """``generator`` makes an AnswerGenerator for the module being trained (its template,
        image processing and token budget are the run's)."""
        self.evaluator = evaluator
        self.items = list(items)
        self.make_generator = generator
        self.run_dir = run_dir
        self.stage = stage
        self.every_n_steps = every_n_steps
        self._answered_at: int | None = None
        self._images_logged = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._answered_at:
            self._answer(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._answered_at:
            self._answer(trainer, pl_module, final=True)

    def _answer(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> None:
        # Every rank generates (an FSDP forward needs them all); rank 0 writes.
        self._answered_at = trainer.global_step
        model = pl_module.model
        was_training = model.training
        try:
            answers = self.make_generator(model).answer([item.prompt for item in self.items], progress=False)
        finally:
            model.train(was_training)
        if not trainer.is_global_zero:
            return
        metrics: dict[str, float] = {}
        if self.evaluator.scored_offline:  # a judged task would call its judge model every round
            by_id = {item.question_id: answer for item, answer in zip(self.items, answers)}
            metrics = self.evaluator.score(self.items, by_id).metrics
        rows = [(item, answer, self.evaluator.reference_text(item)) for item, answer in zip(self.items, answers)]
        title = f"{self.stage}, step {trainer.global_step}" + (" (end of stage)" if final else "")
        self._write_markdown(title, rows, metrics)
        for logger in trainer.loggers:
            _log_table(logger, f"sample_answers/{self.stage}", rows, trainer.global_step, self._image_path,
                       with_images=not self._images_logged)
        self._images_logged = True

    def _image_path(self, index: int) -> Path:
        return self.run_dir / IMAGES / f"{index}.png"

    def _write_markdown(self, title: str, rows: list[tuple[EvalItem, str, str]], metrics: dict[str, float]) -> None:
        path = self.run_dir / MARKDOWN
        lines = [] if path.exists() else ["# Sample answers", "",
                                          "Held-out questions answered during training, round by round.", ""]
        score = (", ".join(f"{name} {value:.3g}" for name, value in list(metrics.items())[:2])
                 or "not scored (a judge scores this task)")
        lines += [f"## {title}", "", f"Score on these {len(rows)} items: {score}", "",
                  "| image | question | answer | reference |", "|---|---|---|---|"]
        for index, (item, answer, reference) in enumerate(rows):
            image = self._image_path(index)
            if not image.exists():  # written in the first round; every round's table points at it
                picture = item.prompt.load_image()
                if picture is not None:
                    image.parent.mkdir(parents=True, exist_ok=True)
                    picture.save(image)
            cell = f"![]({IMAGES}/{index}.png)" if image.exists() else ""
            lines.append(f"| {cell} | {_cell(item.prompt.text)} | {_cell(answer)} | {_cell(reference)} |")
        with open(path, "a") as handle:
            handle.write("\n".join(lines) + "\n\n")


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped, the <image> placeholder dropped."""
    return " ".join(str(text).replace("<image>", "").split()).replace("|", "\\|") or " "


def _log_table(logger: Any, key: str, rows: list[tuple[EvalItem, str, str]], step: int,
               image_path: Callable[[int], Path], with_images: bool) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        # TensorBoard renders Markdown tables in its Text tab; the images (the same every round)
        # go to its Images tab once, numbered as the table's rows.
        table = ["| # | question | answer | reference |", "|---|---|---|---|"]
        table += [f"| {index} | {_cell(item.prompt.text)} | {_cell(answer)} | {_cell(reference)} |"
                  for index, (item, answer, reference) in enumerate(rows)]
        logger.experiment.add_text(key, "\n".join(table), step)
        if with_images:
            from torchvision.transforms.functional import pil_to_tensor

            for index, (item, _, _) in enumerate(rows):
                image = item.prompt.load_image()
                if image is not None:
                    logger.experiment.add_image(f"{key}/{index}", pil_to_tensor(image.convert("RGB")), step)
    elif isinstance(logger, WandbLogger):
        import wandb

        data = [[wandb.Image(str(image_path(index))) if image_path(index).exists() else None,
                 item.prompt.text.replace("<image>", "").strip(), answer, reference]
                for index, (item, answer, reference) in enumerate(rows)]
        logger.log_table(key=key, columns=["image", "question", "answer", "reference"], data=data, step=step)
