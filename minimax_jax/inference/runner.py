"""The work behind `python -m minimax_jax.generate`: load a checkpoint, render prompts (chat,
images), generate, and print or stream the completions (`run_generate`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from minimax_jax import files, outputs, paths
from minimax_jax.config import ModelConfig, check_quantize
from minimax_jax.hf.hf_config import load_hf_dict, stored_dtype
from minimax_jax.hf.pretrained import checkpoint_quantize, from_pretrained, sharding_from_rules
from minimax_jax.inference import chat_template, completions, m1_output, vl_generate
from minimax_jax.inference import engine as sampling
from minimax_jax.inference.tokenizer import ChatTokenizer
from minimax_jax.model.decoder import RunOptions
from minimax_jax.sharding import load_rules, make_mesh
from minimax_jax.vl import processor

DEMO_DIR = Path(__file__).parent.parent / "demo_model"
_CHUNK_SOURCE = {
    "given": "--prefill_chunk",
    "auto": "the largest the memory plan fits",
    "default": "default: device memory unknown",
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: text, or a list of chat messages; its own tools (None: the --tools ones);
    where it came from (for error messages)."""

    value: str | list[dict]
    tools: list[dict] | None = None
    where: str = "--prompt"


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[Prompt]:
    """The --prompt values, then one per line of the JSONL file: {"prompt": str} or
    {"messages": [...]}, each with an optional "tools" list."""
    out = [Prompt(p) for p in prompts]
    if prompts_file:
        path = prompts_file  # read_text refuses a URL by name (a Path would collapse its "//")
        text = files.read_text(path, "a --prompts_file (JSON lines)")
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                out.append(_prompt_line(files.parse_json(line, f"--prompts_file {path}:{n}"),
                                        f"{path}:{n}"))  # fmt: skip
    if not out:
        raise ValueError("no prompt: pass --prompt TEXT or --prompts_file FILE.jsonl")
    return out


def _prompt_line(item, where: str) -> Prompt:
    if not isinstance(item, dict) or not ({"prompt", "messages"} & set(item)):
        raise ValueError(f'{where}: expected {{"prompt": ...}} or {{"messages": ...}}')
    if "prompt" in item:
        if not isinstance(item["prompt"], str):
            raise ValueError(f'{where}: "prompt" must be a string')
        value = item["prompt"]
    else:
        value = item["messages"]
        if not value or not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
            raise ValueError(f'{where}: "messages" must be a non-empty list of objects')
    tools = item.get("tools")
    if tools is not None:
        tools = check_tools(tools, f'{where}: "tools"')
    return Prompt(value, tools, where)


def check_tools(tools, where: str) -> list[dict]:
    """A list of tool schemas (JSON objects), as the chat template receives them."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        got = type(tools).__name__ if not isinstance(tools, list) else "a list with non-objects"
        raise ValueError(f"{where}: expected a JSON list of tool schemas (objects), got {got}")
    return tools


def read_tools(path: str) -> list[dict]:
    """The --tools file: a JSON list of tool schemas."""
    text = files.read_text(path, "a --tools file (a JSON list of tool schemas)")
    return check_tools(files.parse_json(text, f"--tools {path}"), f"--tools {path}")


def parse_template_vars(items: list[str]) -> dict[str, Any]:
    """--template_var KEY=VALUE values: VALUE as JSON when it parses (true, 3, [..]), else the
    string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(
                f"--template_var {item!r}: expected KEY=VALUE with KEY a name (letters, digits, _)"
            )
        if key in chat_template.RESERVED:
            raise ValueError(f"--template_var {key}: the chat itself sets {key!r}; use another")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def render(
    tok,
    item: Prompt,
    *,
    chat: bool,
    system: str | None,
    template: str | None,
    tools: list | None = None,
    variables: dict | None = None,
) -> str:
    """The prompt text the model sees: the chat template applied to the item's messages (a
    plain prompt is one user message), or a plain prompt as is without chat."""
    if isinstance(item.value, list):
        messages = list(item.value)
    elif chat:
        messages = [{"role": "user", "content": item.value}]
    else:
        return item.value
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    tools = item.tools if item.tools is not None else tools
    try:
        return tok.render_chat(messages, template=template, tools=tools, variables=variables)
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None


def checkpoint_dtype(ckpt: Path) -> str:
    """The --dtype default: "bfloat16" for a checkpoint stored in 16-bit floats (bfloat16, or
    float16: same size, bfloat16's range), "float32" for float32 / float64 or none recorded."""
    value = stored_dtype(load_hf_dict(ckpt))
    if value is None or value in ("float32", "float64"):
        return "float32"
    if value in ("bfloat16", "float16"):
        return "bfloat16"
    raise ValueError(
        f"{ckpt / 'config.json'}: dtype {value!r} is not a float dtype; pass --dtype float32 or "
        "--dtype bfloat16"
    )


def run_generate(
    *,
    checkpoint: str | None,
    prompts: list[str],
    prompts_file: str | None = None,
    chat: bool | None = None,
    system: str | None = None,
    chat_template: str | None = None,
    tools: str | None = None,
    template_vars: list[str] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float | None = 0.95,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int = 0,
    stream: bool = False,
    output: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    prefill_chunk: int | None = None,
    images: list[str] | None = None,
    mesh: str | None = None,
    rules: str = "tp_ep",
    attention_impl: str = "auto",
    out=None,
    log=None,
    label: str | None = None,
) -> list[str]:
    """Generate for every prompt; prints (the answer to out, default stdout; reasoning to log,
    default stderr), writes ``output`` (JSONL, one ``Completion.record`` per prompt) and returns
    the completions' text. tools: a --tools file; template_vars: KEY=VALUE strings; dtype None:
    the checkpoint's (``checkpoint_dtype``).

    ``checkpoint``: a local directory, a Hugging Face hub id or a URL (``minimax_jax.paths``;
    None: the demo model). ``label``: how the checkpoint is named in the log line and errors
    (default: as given)."""
    args = dict(locals())
    checkpoint = args.pop("checkpoint")
    if label is None and checkpoint and paths.classify(checkpoint, "--checkpoint") != paths.LOCAL:
        args["label"] = str(checkpoint)
    check_quantize(quantize)
    for image in images or ():
        paths.local_only(image, "--image")
    for value, flag in ((tools, "--tools"), (output, "--output")):
        if value:
            paths.local_only(value, flag)
    if not checkpoint:
        return _run_generate(DEMO_DIR, **args)
    with paths.as_local(checkpoint, "--checkpoint") as ckpt:
        return _run_generate(ckpt, **args)


def _run_generate(ckpt: Path, *, prompts, prompts_file, chat, system, chat_template, tools,
                  template_vars, max_new_tokens, temperature, top_p, top_k, greedy, seed, stream,
                  output, dtype, quantize, prefill_chunk, images, mesh, rules, attention_impl,
                  out, log, label) -> list[str]:  # fmt: skip
    """``run_generate`` with the checkpoint a local directory."""
    out, log = out or sys.stdout, log or sys.stderr
    _check_checkpoint_dir(ckpt, label or str(ckpt))
    if output:
        outputs.check_new_file(Path(output), "--output")
    tok = ChatTokenizer.from_dir(ckpt)
    chat, items, texts = _prompts(tok, prompts=prompts, prompts_file=prompts_file, chat=chat,
                                  system=system, chat_template=chat_template, tools=tools,
                                  template_vars=template_vars, images=images, log=log)  # fmt: skip
    dtype = dtype or checkpoint_dtype(ckpt)
    gen = dict(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
               top_k=top_k, top_p=None if greedy or top_p == 1.0 else top_p, seed=seed)  # fmt: skip
    if images:
        if attention_impl != "auto":
            raise ValueError("--attention_impl is for text models; drop it with --image")
        if quantize is not None:
            raise ValueError("--quantize is for text models; drop it with --image")
        jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        streams = vl_generate.token_streams(
            ckpt,
            tok,
            texts,
            images,
            dtype=jdtype,
            prefill_chunk=prefill_chunk or sampling.DEFAULT_CHUNK,
            **gen,
        )
    else:
        model, options = _load(ckpt, dtype, mesh, rules, attention_impl, quantize)
        streams = _text_streams(tok, model, options, texts, gen, stream, prefill_chunk,
                                label=label or ckpt.name, log=log)  # fmt: skip
    start = time.perf_counter()
    with outputs.new_file(Path(output), "--output") if output else contextlib.nullcontext() as f:
        results = []
        for item, text, (prompt_len, steps) in zip(items, texts, streams, strict=True):
            done = _complete(tok, item, text, prompt_len, steps, chat=chat, stream=stream,
                             out=out, log=log)  # fmt: skip
            results.append(done)
            if f is not None:
                f.write(json.dumps(done.record(), ensure_ascii=False) + "\n")
    elapsed = time.perf_counter() - start
    print(f"[done] {len(results)} completion(s) in {elapsed:.2f}s", file=log)
    return [c.text for c in results]


def _prompts(tok, *, prompts, prompts_file, chat, system, chat_template, tools, template_vars,
             images, log) -> tuple[bool, list[Prompt], list[str]]:  # fmt: skip
    """(chat on, the prompts as given, the texts the model sees) from run_generate's inputs."""
    template = files.read_text(chat_template, "a Jinja chat template") if chat_template else None
    chat = bool(template or tok.chat_template) if chat is None else chat
    tool_list = read_tools(tools) if tools else None
    variables = parse_template_vars(template_vars or [])
    items = read_prompts(prompts, prompts_file)
    if not chat and (tool_list or variables or any(it.tools for it in items)):
        raise ValueError("--tools, --template_var and per-prompt tools need the chat template: "
                         "drop --nochat (or pass --chat_template FILE)")  # fmt: skip
    if tool_list and "tools" not in tok.template_for(template, tool_list):
        print("warning: the chat template does not use `tools`; --tools has no effect", file=log)
    placed = [_with_image_placeholders(it, len(images)) for it in items] if images else items
    texts = [render(tok, it, chat=chat, system=system, template=template, tools=tool_list,
                    variables=variables) for it in placed]  # fmt: skip
    return chat, items, texts


def _check_checkpoint_dir(ckpt: Path, shown: str) -> None:
    if not ckpt.is_dir():
        what = "not a directory" if ckpt.exists() else "no such directory"
        raise files.InputFileError(f"--checkpoint {shown}: {what}; expected a checkpoint directory")
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {shown} is not a checkpoint directory (no config.json)"
        )


def _complete(tok, item: Prompt, text: str, prompt_len: int, steps, *, chat, stream, out, log):
    """Consumes one prompt's token stream, printing it (as it decodes with ``stream``)."""
    in_reasoning = chat and text.rstrip().endswith(m1_output.THINK_OPEN)
    display = completions.Display(tok, out, log, split=chat, in_reasoning=in_reasoning)
    ids, stopped = completions.take_until_eos(
        steps, tok.eos_token_ids, display.push if stream else None
    )
    decoded = tok.decode(ids)
    display.end(decoded)
    return completions.Completion(
        prompt=item.value,
        text=decoded,
        finish_reason="stop" if stopped else "length",
        prompt_tokens=prompt_len,
        new_tokens=len(ids) + int(stopped),
        chat=chat,
        in_reasoning=in_reasoning,
    )


def _text_streams(tok, model, options, texts, gen, stream, prefill_chunk, *, label, log):
    """(prompt tokens, new token ids) per prompt: all prompts in one left-padded batch, or one
    prompt at a time decoded step by step with ``stream``. Checks and plans at once; generates
    as the result is iterated."""
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    engine = sampling.Engine(
        model.config, model.pure_params(), options=options, prefill_chunk=prefill_chunk
    )
    encoded = [tok.encode(t) for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("a prompt encodes to zero tokens")
    max_new = gen["max_new_tokens"]
    plan = engine.plan(len(encoded), max(map(len, encoded)), max_new)
    int8 = f" (int8 weights: {model.quantize})" if model.quantize else ""
    chunk = f"prefill chunk {plan['chunk']} ({_CHUNK_SOURCE[plan['chunk_source']]})"
    print(
        f"[{label}] {model.config.param_count():,} params{int8}; estimated device memory "
        f"{plan['total'] / 2**20:.1f} MiB (weights {plan['weights'] / 2**20:.1f} + cache "
        f"{plan['cache'] / 2**20:.1f} + activations {plan['activations'] / 2**20:.1f}); "
        f"{chunk}; {len(encoded)} prompt(s)",
        file=log,
    )
    sp = sampling.SamplingParams(gen["temperature"], gen["top_k"], gen["top_p"])
    kw = dict(max_new_tokens=max_new, seed=gen["seed"], eos_token_id=tok.eos_token_ids or None)

    def one_at_a_time():
        for ids in encoded:
            steps = sampling.generate_stream(engine, [ids], sampling=sp, **kw)
            yield len(ids), (int(step[0]) for step in steps)

    def batched():
        ids, mask = _left_pad(encoded)
        tokens = sampling.generate(
            None, ids, mask, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
            engine=engine, **kw,
        )  # fmt: skip
        for prompt, row in zip(encoded, tokens, strict=True):
            yield len(prompt), iter(row.tolist())

    return one_at_a_time() if stream else batched()


def parse_mesh(text: str) -> dict[str, int]:
    """ "expert=2,tensor=4" -> {"data": 1, "fsdp": 1, "expert": 2, "tensor": 4, "sequence": 1}."""
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1}
    for item in filter(None, text.replace(" ", "").split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected axis=size with axes {sorted(sizes)}, got {item!r}")
        sizes[name] = int(value)
    return sizes


def _load(
    ckpt: Path,
    dtype: str,
    mesh: str | None,
    rules_name: str,
    attention_impl: str = "auto",
    quantize: str | None = None,
):
    """The model (parameters placed by the rules when a mesh is given) and its RunOptions."""
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    quantize = checkpoint_quantize(ckpt, quantize)  # a converted int8 checkpoint's own scheme
    if not mesh:
        model = from_pretrained(ckpt, dtype=jdtype, quantize=quantize)
        return model, RunOptions(attention_impl=attention_impl)
    rules, _ = load_rules(rules_name)
    sizes = parse_mesh(mesh)
    device_mesh = make_mesh(sizes)
    sharding = sharding_from_rules(ModelConfig.from_hf(ckpt), device_mesh, rules, quantize)
    options = RunOptions(
        moe_impl=rules.moe_impl, mesh=device_mesh, rules=rules, attention_impl=attention_impl
    )
    return from_pretrained(ckpt, dtype=jdtype, sharding=sharding, quantize=quantize), options


def _with_image_placeholders(item: Prompt, num_images: int) -> Prompt:
    """One <image> per image prepended to a plain prompt that has none; image parts of chat
    messages become <image> in their text."""
    if isinstance(item.value, str):
        value = processor.ensure_placeholders(item.value, num_images)
    else:
        value = [processor.image_parts_to_text(m) for m in item.value]
    return dataclasses.replace(item, value=value)


def _left_pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s) :] = s
        mask[i, t - len(s) :] = 1
    return ids, mask
