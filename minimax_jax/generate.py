"""`python -m minimax_jax.generate`: text generation from a checkpoint, with chat and streaming.

    python -m minimax_jax.generate --prompt "def fibonacci(n):" --max_new_tokens 64
    python -m minimax_jax.generate --checkpoint DIR --system "Be brief." --prompt "Hi" --stream
    python -m minimax_jax.generate --checkpoint DIR --quantize experts_int8 --prompt "Hi"
    python -m minimax_jax.generate --checkpoint MiniMaxAI/MiniMax-M1-80k --mesh ... --prompt "Hi"
    python -m minimax_jax.generate --checkpoint M1 --tools t.json --prompt "Hi" --output o.jsonl

With no --checkpoint it runs the small demo model shipped in the package (CPU, seconds).
Prompts: --prompt (repeatable) or --prompts_file FILE.jsonl with one {"prompt": str} or
{"messages": [...]} object per line, each optionally with "tools". Stops at the checkpoint's eos
tokens (<end_of_sentence>). Chat completions print the answer on stdout and MiniMax-M1's
reasoning (<think>...</think>) on stderr after "[reasoning] "; --output FILE.jsonl also records
the tool calls.
MiniMax-VL-01 checkpoints take --image PATH (repeatable); each `<image>` in a prompt is replaced
by that image's features (one placeholder per image is prepended when the prompt has none).
"""

from __future__ import annotations

import os

import jax
from absl import flags

from minimax_jax import cli, generation_config, paths
from minimax_jax.config import QUANTIZE_SCHEMES
from minimax_jax.distributed import MODES as DISTRIBUTED_MODES
from minimax_jax.distributed import maybe_initialize_distributed
from minimax_jax.inference.runner import DEMO_DIR, parse_mesh, read_prompts, run_generate  # noqa: F401
from minimax_jax.model.attention import ATTENTION_IMPLS

# Its own FlagValues (joined to absl's FLAGS in `run`): tests import this module together with
# other CLIs (convert.*) whose flags share names such as --dtype, --prompt and --seed.
_FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "Checkpoint: local dir, HF hub id owner/name[@rev], or gs:// URL (default: demo).",
    flag_values=_FLAGS,
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
_TOOLS = flags.DEFINE_string(
    "tools",
    None,
    "JSON file with a list of tool schemas for the chat template (a prompts_file line's "
    '"tools" wins for that line).',
    flag_values=_FLAGS,
)
_TEMPLATE_VAR = flags.DEFINE_multi_string(
    "template_var",
    [],
    "KEY=VALUE passed to the chat template (repeatable); VALUE is read as JSON when it parses "
    "(true, 3), else as a string.",
    flag_values=_FLAGS,
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Write one JSON object per completion to this new file (JSONL): prompt, text, reasoning, "
    "content, tool_calls, errors, finish_reason, prompt_tokens, new_tokens.",
    flag_values=_FLAGS,
)
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", 64, "Tokens to generate per prompt.", lower_bound=1, flag_values=_FLAGS
)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "Sampling temperature (0 = greedy).", flag_values=_FLAGS
)
_TOP_P = flags.DEFINE_float(
    "top_p", 0.95, "Nucleus sampling threshold (1 = off).", flag_values=_FLAGS
)
_TOP_K = flags.DEFINE_integer(
    "top_k", None, "Keep the k most likely tokens.", lower_bound=0, flag_values=_FLAGS
)
_GREEDY = flags.DEFINE_boolean(
    "greedy", False, "Greedy decoding (overrides temperature).", flag_values=_FLAGS
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Sampling seed.", lower_bound=0, upper_bound=cli.SEED_MAX, flag_values=_FLAGS
)
_STREAM = flags.DEFINE_boolean(
    "stream", False, "Print text as it is decoded (reasoning on stderr).", flag_values=_FLAGS
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Weights dtype. Default: the checkpoint's (config.json dtype / torch_dtype: bfloat16 for a "
    "16-bit checkpoint, float32 when it records none).",
    flag_values=_FLAGS,
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    list(QUANTIZE_SCHEMES),
    "Int8 weight-only quantisation (text models): experts_int8 = expert FFN weights, int8 = "
    "every matmul weight of the layers; per-output-channel fp32 scales; norms, router, "
    "embeddings and lm_head stay in --dtype. Default: none (or the scheme a checkpoint "
    "converted with hf_to_orbax --quantize was stored with).",
    flag_values=_FLAGS,
)
_CHUNK = flags.DEFINE_integer(
    "prefill_chunk",
    None,
    "Prefill chunk length (tokens); a multiple of the mesh's sequence size, whose devices split "
    "each chunk. Default: the largest chunk whose planned memory fits the device (printed).",
    lower_bound=1,
    flag_values=_FLAGS,
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
    list(ATTENTION_IMPLS),
    "Softmax layers' prefill attention (text models): blockwise = online softmax over key "
    "blocks (memory linear in length), cudnn = cuDNN flash attention (GPU, bfloat16), xla = "
    "materialised scores (the reference); auto = blockwise, or cudnn for a plain causal call.",
    flag_values=_FLAGS,
)
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "Image file for MiniMax-VL-01 (repeatable).", flag_values=_FLAGS
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(DISTRIBUTED_MODES),
    "Join a multi-process job (jax.distributed): auto = when the environment shows one (a TPU "
    "slice of several hosts, Slurm, Open MPI, JAX_COORDINATOR_ADDRESS); on = always (JAX "
    "detects the cluster); off = never.",
    flag_values=_FLAGS,
)

cli.finite(_TEMPERATURE, minimum=0)
cli.finite(_TOP_P, minimum=1e-9, maximum=1)
_HOLDERS = (_CHECKPOINT, _PROMPT, _PROMPTS_FILE, _CHAT, _SYSTEM, _TEMPLATE, _TOOLS, _TEMPLATE_VAR,
            _MAX_NEW, _TEMPERATURE, _TOP_P, _TOP_K, _GREEDY, _SEED, _STREAM, _OUTPUT, _DTYPE,
            _QUANTIZE, _CHUNK, _MESH, _RULES, _ATTENTION, _IMAGE, _DISTRIBUTED)  # fmt: skip


def main(argv):
    _FLAGS.mark_as_parsed()  # parsed through absl's FLAGS, which holds the same Flag objects
    if len(argv) > 1:
        cli.error_exit(f"unexpected arguments {argv[1:]}: every input is a flag (see --help)")
    cli.guard(_generate)


def _generate() -> None:
    # A multi-process launch (every host runs this command with --mesh over all devices): join it
    # before JAX is used; process 0 prints, the others compute in step silently.
    maybe_initialize_distributed(_DISTRIBUTED.value)
    quiet = jax.process_index() != 0
    sink = open(os.devnull, "w") if quiet else None  # noqa: SIM115 - lives as long as the run
    # A hub id is fetched and a URL copied once, here; the run reads the local directory.
    given = _CHECKPOINT.value
    if not given:
        _generate_from(DEMO_DIR, None, sink)
        return
    local = paths.classify(given, "--checkpoint") == paths.LOCAL
    with paths.as_local(given, "--checkpoint") as ckpt:
        _generate_from(ckpt, None if local else given, sink)


def _generate_from(ckpt, label: str | None, sink) -> None:
    # Sampling flags not given on the command line come from generation_config.json.
    sampling_flags = (_MAX_NEW, _TEMPERATURE, _TOP_P, _TOP_K, _GREEDY)
    sampling = generation_config.merge(
        generation_config.sampling_defaults(ckpt),
        {f.name: f.value for f in sampling_flags},
        {f.name for f in sampling_flags if f.present},
    )
    run_generate(
        checkpoint=ckpt,
        prompts=_PROMPT.value,
        prompts_file=_PROMPTS_FILE.value,
        chat=_CHAT.value,
        system=_SYSTEM.value,
        chat_template=_TEMPLATE.value,
        tools=_TOOLS.value,
        template_vars=_TEMPLATE_VAR.value,
        **sampling,
        seed=_SEED.value,
        stream=_STREAM.value,
        output=None if sink is not None else _OUTPUT.value,  # process 0 writes the file
        dtype=_DTYPE.value,
        quantize=_QUANTIZE.value,
        prefill_chunk=_CHUNK.value,
        images=_IMAGE.value,
        mesh=_MESH.value,
        rules=_RULES.value,
        attention_impl=_ATTENTION.value,
        out=sink,
        log=sink,
        label=label,
    )


def run():
    """Console-script entry point (``minimax-jax-generate``)."""
    cli.run(main, __doc__, _HOLDERS, extra=_FLAGS)


if __name__ == "__main__":
    run()
