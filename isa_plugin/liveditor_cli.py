"""``isa convert-liveditor``: the authors' LIVEditor checkpoint -> a ``LIVEditorPipeline`` folder."""

from __future__ import annotations

from .cli import command


def _arguments(p) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="the authors' checkpoint (liveditor_ckpt.bin, or a .safetensors export)")
    p.add_argument("--base", required=True, metavar="WAN_DIR",
                   help="a Wan diffusers folder (e.g. Wan2.2-T2V-A14B-Diffusers): its text encoder, tokenizer and VAE are copied")
    p.add_argument("--out", required=True, metavar="DIR", help="the pipeline folder to write")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="store the transformer in this dtype (default: as in the checkpoint)")
    p.add_argument("--prefix", help="keep only checkpoint keys under this prefix (e.g. model_ema.) when the file holds several copies")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--link-base", action="store_true", help="hard-link the base's files instead of copying them (same file system)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--config", metavar="JSON", help="transformer config (WanTransformer3DModel names) as a JSON object or file; "
                                                    "default the 14B config")


@command("convert-liveditor", help="convert the LIVEditor-14B checkpoint into a LIVEditorPipeline folder", arguments=_arguments)
def convert(args) -> int:
    """Validate the checkpoint's keys and shapes, then stream it into safetensors shards beside the base's
    text encoder, tokenizer and VAE and the authors' sampler (UniPC, shift 6)."""
    import json
    from pathlib import Path

    import torch

    from .cli import CLIError
    from .pipelines.liveditor_convert import convert_liveditor_checkpoint

    config = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        try:
            config = json.loads(text)
        except ValueError as e:
            raise CLIError(f"--config: neither a JSON object nor a JSON file ({e})") from None
        if not isinstance(config, dict):
            raise CLIError(f"--config: expected a JSON object, got {type(config).__name__}")
        config = {k: v for k, v in config.items() if not k.startswith("_")}  # a config.json's _class_name etc.

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[args.dtype]
    out = convert_liveditor_checkpoint(args.checkpoint, args.base, args.out, torch_dtype=dtype, prefix=args.prefix,
                                       max_shard_size=args.max_shard_size, link_base=args.link_base, overwrite=args.overwrite,
                                       **config)
    print(f"wrote {out}; load it with isa_plugin.pipelines.LIVEditorPipeline.from_pretrained({str(out)!r})")
    return 0
