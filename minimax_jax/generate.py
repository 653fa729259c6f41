"""`python -m minimax_jax.generate`: text generation from a checkpoint, with chat and streaming.

    python -m minimax_jax.generate --prompt "def fibonacci(n):" --max_new_tokens 64
    python -m minimax_jax.generate --checkpoint DIR --system "Be brief." --prompt "Hi" --stream

With no --checkpoint it runs the small demo model shipped in the package (CPU, seconds).
Prompts: --prompt (repeatable) or --prompts_file FILE.jsonl with one {"prompt": str} or
{"messages": [...]} object per line. Stops at the checkpoint's eos tokens (<end_of_sentence>).
MiniMax-VL-01 checkpoints take --image PATH (repeatable); each `<image>` in a prompt is replaced
by that image's features (one placeholder per image is prepended when the prompt has none).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from minimax_jax import generation_config

DEMO_DIR = Path(__file__).parent / "demo_model"

# Its own FlagValues (joined to absl's FLAGS in `run`): tests import this module together with
# other CLIs (convert.*) whose flags share names such as --dtype, --prompt and --seed.
_FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "HF-style checkpoint dir (default: demo).", flag_values=_FLAGS
)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).", flag_values=_FLAGS)
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "JSONL with prompt or messages.", flag_values=_FLAGS
)
_CHAT = flags.DEFINE_boolean(
    "chat", None, "Apply the chat template (default: if it has one).", flag_values=_FLAGS
)
_SYSTEM = flags.DEFINE_string("system", None, "System message for --chat.", flag_values=_FLAGS)
_TEMPLATE = flags.DEFINE_string(
    "chat_template", None, "Jinja chat template file.", flag_values=_FLAGS
)
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 64, "Tokens to generate per prompt.", flag_values=_FLAGS
)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "Sampling temperature (0 = greedy).", flag_values=_FLAGS
)
_TOP_P = flags.DEFINE_float(
    "top_p", 0.95, "Nucleus sampling threshold (1 = off).", flag_values=_FLAGS
)
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.", flag_values=_FLAGS)
_GREEDY = flags.DEFINE_boolean(
    "greedy", False, "Greedy decoding (overrides temperature).", flag_values=_FLAGS
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=_FLAGS)
_STREAM = flags.DEFINE_boolean("stream", False, "Print text as it is decoded.", flag_values=_FLAGS)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Weights dtype.", flag_values=_FLAGS
)
_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 256, "Prefill chunk length (tokens).", flag_values=_FLAGS
)
_MESH = flags.DEFINE_string(
    "mesh",
    None,
    "Mesh axis sizes, e.g. expert=2,tensor=4 (default: one device).",
    flag_values=_FLAGS,
)
_RULES = flags.DEFINE_string(
    "rules", "tp_ep", "Sharding rules preset (configs/mesh) or YAML path.", flag_values=_FLAGS
)
_ATTENTION = flags.DEFINE_enum(
    "attention_impl",
    "auto",
    ["auto", "xla", "cudnn"],
    "Softmax layers' prefill attention: cudnn = cuDNN flash attention (GPU, bfloat16; text "
    "models), auto = xla for now.",
    flag_values=_FLAGS,
)
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "Image file for MiniMax-VL-01 (repeatable).", flag_values=_FLAGS
)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[dict | str]:
    """Plain strings or {"messages": [...]} dicts, in order."""
    out: list[dict | str] = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.exists():
            raise FileNotFoundError(f"--prompts_file {path} does not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(item, dict) or not ({"prompt", "messages"} & set(item)):
                raise ValueError(f'{path}:{n}: expected {{"prompt": ...}} or {{"messages": ...}}')
            out.append(item["prompt"] if "prompt" in item else {"messages": item["messages"]})
    if not out:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts_file FILE.jsonl")
    return out


def render(tok, item, *, chat: bool, system: str | None, template: str | None) -> str:
    if isinstance(item, dict):
        messages = list(item["messages"])
    elif chat:
        messages = [{"role": "user", "content": item}]
    else:
        return item
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return tok.render_chat(messages, template=template)


def run_generate(
    *,
    checkpoint: str | None,
    prompts: list[str],
    prompts_file: str | None = None,
    chat: bool | None = None,
    system: str | None = None,
    chat_template: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int = 0,
    stream: bool = False,
    dtype: str = "float32",
    prefill_chunk: int = 256,
    images: list[str] | None = None,
    mesh: str | None = None,
    rules: str = "tp_ep",
    attention_impl: str = "auto",
    out=None,
    log=None,
) -> list[str]:
    """Generate for every prompt; prints (to out, default stdout) and returns the completions."""
    out, log = out or sys.stdout, log or sys.stderr
    from minimax_jax import sampling
    from minimax_jax.tokenizer import ChatTokenizer, StreamDecoder

    ckpt = Path(checkpoint) if checkpoint else DEMO_DIR
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint directory (no config.json)")
    tok = ChatTokenizer.from_dir(ckpt)
    template = Path(chat_template).read_text() if chat_template else None
    chat = (template or tok.chat_template) is not None if chat is None else chat
    items = read_prompts(prompts, prompts_file)
    if images:
        items = [_with_image_placeholders(it, len(images)) for it in items]
    texts = [render(tok, it, chat=chat, system=system, template=template) for it in items]
    if images:
        from minimax_jax import vl_model

        if attention_impl != "auto":
            raise ValueError("--attention_impl is for text models; drop it with --image")

        return vl_model.generate_for_cli(
            ckpt, tok, texts, images, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
            stream=stream, out=out, max_new_tokens=max_new_tokens,
            temperature=0.0 if greedy else temperature, top_k=top_k,
            top_p=None if greedy or top_p == 1.0 else top_p, seed=seed,
            prefill_chunk=prefill_chunk,
        )  # fmt: skip
    model, options = _load(ckpt, dtype, mesh, rules, attention_impl)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    sp = sampling.SamplingParams(
        0.0 if greedy else temperature, top_k, None if greedy or top_p == 1.0 else top_p
    )
    engine = sampling.Engine(
        model.config, model.pure_params(), options=options, prefill_chunk=prefill_chunk
    )
    encoded = [tok.encode(t) for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("a prompt encodes to zero tokens")
    plan = engine.plan(len(encoded), max(map(len, encoded)), max_new_tokens)
    print(
        f"[{ckpt.name}] {model.config.param_count():,} params; estimated device memory "
        f"{plan['total'] / 2**20:.1f} MiB (weights {plan['weights'] / 2**20:.1f} + cache "
        f"{plan['cache'] / 2**20:.1f} + activations {plan['activations'] / 2**20:.1f}); "
        f"{len(encoded)} prompt(s)",
        file=log,
    )
    kw = dict(max_new_tokens=max_new_tokens, seed=seed, eos_token_id=tok.eos_token_ids or None)
    results = []
    start = time.perf_counter()
    if stream:
        for ids in encoded:  # one prompt at a time, printed as it decodes
            dec = StreamDecoder(tok)
            for step in sampling.generate_stream(engine, [ids], sampling=sp, **kw):
                if int(step[0]) in tok.eos_token_ids:
                    break
                out.write(dec.push(int(step[0])))
                out.flush()
            out.write("\n")
            results.append(tok.decode(dec.ids))
    else:
        ids, mask = _left_pad(encoded)
        tokens = sampling.generate(
            None,
            ids,
            mask,
            temperature=sp.temperature,
            top_k=sp.top_k,
            top_p=sp.top_p,
            engine=engine,
            **kw,
        )
        for row in tokens:
            row = list(row)
            cut = next((i for i, t in enumerate(row) if t in tok.eos_token_ids), len(row))
            results.append(tok.decode(row[:cut]))
            print(results[-1], file=out)
    elapsed = time.perf_counter() - start
    print(f"[done] {len(results)} completion(s) in {elapsed:.2f}s", file=log)
    return results


def parse_mesh(text: str) -> dict[str, int]:
    """ "expert=2,tensor=4" -> {"data": 1, "fsdp": 1, "expert": 2, "tensor": 4}."""
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in filter(None, text.replace(" ", "").split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected axis=size with axes {sorted(sizes)}, got {item!r}")
        sizes[name] = int(value)
    return sizes


def _load(ckpt: Path, dtype: str, mesh: str | None, rules_name: str, attention_impl: str = "auto"):
    """The model (parameters placed by the rules when a mesh is given) and its RunOptions."""
    from minimax_jax.config import ModelConfig
    from minimax_jax.ops.decoder import RunOptions
    from minimax_jax.pretrained import from_pretrained, sharding_from_rules
    from minimax_jax.sharding import load_rules, make_mesh

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if not mesh:
        return from_pretrained(ckpt, dtype=jdtype), RunOptions(attention_impl=attention_impl)
    rules, _ = load_rules(rules_name)
    device_mesh = make_mesh(parse_mesh(mesh))
    sharding = sharding_from_rules(ModelConfig.from_hf(ckpt), device_mesh, rules)
    options = RunOptions(
        moe_impl=rules.moe_impl, mesh=device_mesh, rules=rules, attention_impl=attention_impl
    )
    return from_pretrained(ckpt, dtype=jdtype, sharding=sharding), options


def _with_image_placeholders(item, num_images: int):
    """One <image> per image prepended to a plain prompt that has none; image parts of chat
    messages become <image> in their text."""
    from minimax_jax import processor

    if isinstance(item, str):
        return processor.ensure_placeholders(item, num_images)
    return {"messages": [processor.image_parts_to_text(m) for m in item["messages"]]}


def _left_pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s) :] = s
        mask[i, t - len(s) :] = 1
    return ids, mask


def main(argv):
    _FLAGS.mark_as_parsed()  # parsed through absl's FLAGS, which holds the same Flag objects
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    import jax

    from minimax_jax.sharding import maybe_initialize_distributed

    try:
        # A multi-process launch (every host runs this command with --mesh over all devices):
        # join it before JAX is used; process 0 prints, the others compute in step silently.
        maybe_initialize_distributed()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    quiet = jax.process_index() != 0
    sink = open(os.devnull, "w") if quiet else None  # noqa: SIM115 - lives as long as the run
    try:
        # Sampling flags not given on the command line come from generation_config.json.
        sampling_flags = (_MAX_NEW, _TEMPERATURE, _TOP_P, _TOP_K, _GREEDY)
        sampling = generation_config.merge(
            generation_config.sampling_defaults(_CHECKPOINT.value or DEMO_DIR),
            {f.name: f.value for f in sampling_flags},
            {f.name for f in sampling_flags if f.present},
        )
        run_generate(
            checkpoint=_CHECKPOINT.value,
            prompts=_PROMPT.value,
            prompts_file=_PROMPTS_FILE.value,
            chat=_CHAT.value,
            system=_SYSTEM.value,
            chat_template=_TEMPLATE.value,
            **sampling,
            seed=_SEED.value,
            stream=_STREAM.value,
            dtype=_DTYPE.value,
            prefill_chunk=_CHUNK.value,
            images=_IMAGE.value,
            mesh=_MESH.value,
            rules=_RULES.value,
            attention_impl=_ATTENTION.value,
            out=sink,
            log=sink,
        )
    except (ValueError, FileNotFoundError, TypeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    flags.FLAGS.append_flag_values(_FLAGS)
    app.run(main)


if __name__ == "__main__":
    run()
