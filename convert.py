"""
Fine-tunes that travel: this repo's LoRA and sparse-delta files to the adapter folders other tools use, and
back. A LoRA adapter becomes a Hugging Face PEFT LoRA folder (PEFT, vLLM and TGI serve it unmerged on the HF
layout of the base); a SpIEL delta becomes the authors' SFT folder (their PEFT fork's `sft` tuner). Both
kinds of folder also work as they are wherever this repo takes a fine-tune (generate.py --delta FOLDER,
merge.py --delta FOLDER); `--to spiel` turns one into our file (e.g. for plot.py --mask). The formats, and
the q/k row order they move between: adapters.py.

    python convert.py runs/x/lora.safetensors --to peft --ckpt llama-2-7b lora-peft/
    python convert.py runs/x/delta.safetensors --to sft --ckpt llama-2-7b delta-sft/
    python convert.py their-sft-folder/ --to spiel --ckpt Llama-2-7b-hf delta.safetensors
"""

import os
import sys

import adapters
import finetune
import hub
from config import Parser
from files import CheckpointError, check_new_folder, check_writable
from llama import check_checkpoint, read_args


def convert(src: str, to: str, out: str, ckpt: str, base_name=None):
    """SRC (our .safetensors file, or a PEFT LoRA / SFT folder) -> OUT in format `to` (peft, sft or spiel).
    Of the base (--ckpt) only the config and the few weights of its fingerprint are read: a fine-tune of another
    base is refused, as generate.py and merge.py refuse it. OUT is never overwritten: checked first (that it is
    new and can be written), written to a temporary name and renamed."""
    if to == "spiel" and os.path.exists(out):
        raise FileExistsError(f"{out}: exists; choose a new output file")
    if to != "spiel":
        check_new_folder(out)
    check_writable(out, "output " + ("file" if to == "spiel" else "folder"), folder=to != "spiel")
    folder = hub.resolve(ckpt)  # (a Hub id stays the adapter's base_model_name_or_path)
    args = read_args(folder, check_checkpoint(folder))
    ft = finetune.read(src, args)
    base = adapters.base_shapes(args)
    for name, shape in ft.shapes.items():
        if base.get(name) != tuple(shape):
            raise CheckpointError(f"{src}: {name} is {'x'.join(map(str, shape))} in the file but "
                                  f"{'x'.join(map(str, base[name])) if name in base else 'absent'} in {ckpt} "
                                  f"(another model?)")
    if to == "peft" and ft.kind != "spiel-lora":
        raise ValueError(f"{src}: a sparse delta has no PEFT LoRA form (--to sft writes the authors' SFT folder)")
    if to == "sft" and ft.kind != "spiel-delta":
        raise ValueError(f"{src}: a LoRA adapter has no SFT form (--to peft writes a PEFT LoRA folder)")
    if to == "spiel" and not os.path.isdir(src):
        raise ValueError(f"{src}: already this repo's format (--to spiel reads a PEFT LoRA or SFT folder)")
    finetune.check_base(ft, finetune.base_at(folder, args))  # (a folder made elsewhere records no base: passes)
    name = base_name or (ckpt if folder != ckpt else os.path.abspath(ckpt))
    if to == "peft":
        adapters.write_peft(out, ft.tensors, ft.meta, ft.shapes, args, name)
    elif to == "sft":
        adapters.write_sft(out, ft.tensors, ft.meta, ft.shapes, args, name)
    else:  # the base fields only where the folder carried them (a foreign folder's base cannot be told)
        finetune.write_file(out, ft.kind, ft.tensors, ft.meta, ft.shapes)


def main(argv=None):
    ap = Parser(prog="convert.py", description=__doc__)
    ap.add_argument("src", help="a delta.safetensors / lora.safetensors of this repo, or a PEFT LoRA / SFT folder")
    ap.add_argument("--to", required=True, choices=["peft", "sft", "spiel"],
                    help="peft: a PEFT LoRA folder; sft: the authors' SFT folder; spiel: this repo's file")
    ap.add_argument("out", help="the new folder (peft, sft) or file (spiel); never overwritten")
    ap.add_argument("--ckpt", required=True, help="the base (Meta or HF layout, or a Hub id ORG/NAME); only its "
                                                  "config and fingerprint are read")
    ap.add_argument("--base-name", help="the folder's base_model_name_or_path (default: --ckpt's absolute path)")
    args = ap.parse_args(argv)
    convert(args.src, args.to, args.out, args.ckpt, args.base_name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, ValueError, FileExistsError) as e:
        sys.exit(f"error: {e}")
