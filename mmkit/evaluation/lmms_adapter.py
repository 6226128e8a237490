"""mmkit models inside the lmms-eval harness (``pip install mmkit[lmms]``).

    lmms-eval --model mmkit --model_args model=RUN_FOLDER --tasks mme --device cpu

mmkit's package metadata registers :func:`manifest` in lmms-eval's ``lmms_eval.models`` entry-point
group, so the harness finds the ``mmkit`` model without a fork or a converted checkpoint. Answers
come from the same :class:`~mmkit.inference.generation.AnswerGenerator` as ``python -m
mmkit.evaluate``: the run's own conversation template and image processing, greedy decoding unless a task asks to sample.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from mmkit.core.distributed import join_launched_group, rank_and_world
from mmkit.core.errors import ConfigError
from mmkit.core.interfaces import IMAGE_TOKEN
from mmkit.inference.from_run import build_generator
from mmkit.inference.generation import Prompt, Sampling
from mmkit.models.load import load_run


def manifest() -> Any:
    """What the ``lmms_eval.models`` entry point hands the harness (a ``ModelManifest``)."""
    # Imported here: lmms_eval.models loads this module's entry point while it initialises.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmkit", simple_class_path=f"{__name__}.MmkitModel")


class MmkitModel(lmms):
    """A trained mmkit run folder as an lmms-eval model.

    ``model_args``: ``model`` (the run folder, required), ``max_new_tokens`` (when a task names
    none, default 128), ``trust_remote_code`` (default false: the run's LM may not run Python files
    of its own, whatever its saved config says). ``--batch_size`` and ``--device`` are the
    harness's own flags. Launched with ``accelerate launch`` or ``torchrun``, each process answers
    its rank's share of the requests on its own device (cuda:LOCAL_RANK for ``--device cuda``).
    """

    def __init__(
        self,
        model: str | None = None,
        max_new_tokens: int | str = 128,
        batch_size: int | str = 1,
        device: str = "cpu",
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"--model_args {', '.join(sorted(unknown))}: unknown to the mmkit model; "
                              "it takes model, max_new_tokens, trust_remote_code")
        if not model:
            raise ConfigError("--model_args model=RUN_FOLDER is required: the mmkit run folder to evaluate")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device here; pass --device cpu")
        cfg, vlm = load_run(model, trust_remote_code)
        # Under accelerate launch or torchrun, lmms-eval splits the requests by these, as for its own models.
        self.device = join_launched_group(torch.device(device))
        self._rank, self._world_size = rank_and_world()
        self.generator = build_generator(cfg, vlm.to(self.device), int(batch_size), int(max_new_tokens))
        self.default_max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests: Sequence[Instance]) -> list[str]:
        prompts, settings = [], []
        for context, gen_kwargs, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            image = self._image(doc_to_visual(self.task_dict[task][split][doc_id]), task)
            prompts.append(self._prompt(context, image))
            settings.append(self._sampling(dict(gen_kwargs or {})))
        answers: list[str] = [""] * len(prompts)
        # One generate pass per distinct setting; within it, the generator batches.
        for sampling in dict.fromkeys(settings):
            indices = [i for i, s in enumerate(settings) if s == sampling]
            texts = self.generator.answer([prompts[i] for i in indices], progress=self.rank == 0, desc="mmkit answering",
                                         sampling=sampling)
            for i, text in zip(indices, texts):
                answers[i] = text
        return answers

    def _sampling(self, gen_kwargs: dict[str, Any]) -> Sampling:
        until = gen_kwargs.get("until") or []
        temperature = float(gen_kwargs.get("temperature") or 0) if gen_kwargs.get("do_sample") else 0.0
        return Sampling(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens),
            temperature=temperature,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            stop=tuple([until] if isinstance(until, str) else until),
        )

    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt, and whether greedy decoding
        would have produced it, with the run's own template around the prompt."""
        results = []
        model, tokenizer = self.generator.model, self.generator.model.tokenizer
        for context, target, doc_to_visual, doc_id, task, split in (request.args for request in requests):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            image = self._image(doc_to_visual(doc), task)
            prompt = self._prompt(context, image)
            prompt_ids = self.generator.prompt_ids(prompt)
            continuation_ids = tokenizer(str(continuation), add_special_tokens=False).input_ids
            input_ids = torch.tensor([prompt_ids + continuation_ids], device=self.device)
            pixel_values = None
            if image is not None:
                pixel_values = self.generator.image_processor(image).unsqueeze(0).to(self.device)
            with torch.no_grad():
                logits = model(input_ids, torch.ones_like(input_ids), pixel_values).logits[0]
            # The logits at position t predict token t + 1.
            predicting = logits[len(prompt_ids) - 1 : -1].float().log_softmax(-1)
            targets = torch.tensor(continuation_ids, device=self.device)
            logprob = float(predicting.gather(-1, targets.unsqueeze(-1)).sum())
            results.append((logprob, bool((predicting.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests: Sequence[Instance]) -> list[str]:
        raise NotImplementedError("the mmkit model answers single-round tasks (generate_until, loglikelihood)")

    @staticmethod
    def _image(visuals: Any, task: str) -> Image.Image | None:
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if not visuals:
            return None
        if len(visuals) > 1 or not isinstance(visuals[0], Image.Image):
            raise ConfigError(
                f"task {task}: gives {len(visuals)} visual(s) of type {type(visuals[0]).__name__}; "
                "mmkit models take one image per prompt"
            )
        return visuals[0].convert("RGB")

    @staticmethod
    def _prompt(context: str, image: Image.Image | None) -> Prompt:
        if image is not None and IMAGE_TOKEN not in context:
            context = f"{IMAGE_TOKEN}\n{context}"
        return Prompt([{"from": "human", "value": context}], image)
