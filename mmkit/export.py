"""Move models between mmkit and transformers' LlavaForConditionalGeneration (llava-hf) format, and import LLaVA's own.

    python -m mmkit.export to-hf RUN_FOLDER OUT_DIR
    python -m mmkit.export to-hf RUN_FOLDER/finetune/trainable.safetensors OUT_DIR
    python -m mmkit.export from-hf llava-1.5-7b-hf OUT_RUN_FOLDER
    python -m mmkit.export from-llava llava-v1.5-7b OUT_RUN_FOLDER   (haotian-liu/LLaVA's LlavaLlamaForCausalLM)
"""
from __future__ import annotations

import argparse
import sys

from mmkit.core.errors import MmkitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkit.export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="write an HF LlavaForConditionalGeneration folder (weights, config, processor)")
    to_hf.add_argument("run", help="an mmkit run folder, or a stage checkpoint RUN/<stage>/trainable.safetensors")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--trust-remote-code", action="store_true",
                       help="let the run's LM run Python files of its own (an auto_map); its saved config never can")
    from_hf = sub.add_parser("from-hf", help="turn an HF Llava folder into an mmkit run folder (model=OUT)")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out_dir")
    from_llava = sub.add_parser("from-llava", help="turn a LLaVA folder (haotian-liu/LLaVA's LlavaLlamaForCausalLM) "
                                "into an mmkit run folder (model=OUT)")
    from_llava.add_argument("llava_dir")
    from_llava.add_argument("out_dir")
    args = parser.parse_args(argv)

    # Deferred: transformers loads only once the arguments are good.
    from mmkit.interchange.hf_llava import export_run, import_hf
    from mmkit.interchange.llava_original import import_llava

    try:
        if args.command == "to-hf":
            out = export_run(args.run, args.out_dir, trust_remote_code=args.trust_remote_code)
            print(f"wrote {out}: load it with transformers.LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
        else:
            if args.command == "from-hf":
                overrides = import_hf(args.hf_dir, args.out_dir)
            else:
                overrides = import_llava(args.llava_dir, args.out_dir)
            print(f"wrote {args.out_dir}: use it as model={args.out_dir}; to train on from it:")
            print("python -m mmkit.train " + " ".join(overrides))
    except (MmkitError, OSError) as exc:  # OSError: transformers' "not a model folder"
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
