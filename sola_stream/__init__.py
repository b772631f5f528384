"""sola_stream: training-free SoLA compression of LLMs, one decoder block at a time.

Python API (the same work as the command line, without a shell):

    import sola_stream
    summary = sola_stream.compress("models/smollm2-135m", "runs/smol-20", ratio=0.2)
    result = sola_stream.evaluate("runs/smol-20", max_windows=64)   # perplexity, streamed
    model = sola_stream.load("runs/smol-20")                        # a transformers model

Errors a user can fix raise sola_stream.errors.SolaError (InputError, OutputError) with a
one-line message; a graceful stop raises sola_stream.pipeline.stop.Interrupted.
"""

__version__ = "0.3.0"


def compress(model, output, *, ratio: float = 0.2, method: str = "sola", overwrite: bool = False,
             progress: bool = True, **options):
    """Compress `model` (checkpoint directory or hub id) into `output`; an interrupted run resumes.

    `options` are the CLI's compress options as keywords (prime_ratio, ratio_of, calib, nsamples,
    seqlen, seed, device, propagate, batch_tokens, max_gpu_memory, max_host_memory, threads;
    prime_ratio: a number or "auto", the default as on the CLI; prime_choices=(...): auto among
    those splits).
    Returns an engine.Summary (achieved ratios, seconds, peak memory, ...)."""
    from sola_stream.pipeline.engine import CompressOptions, compress as _compress
    from sola_stream.pipeline.options import prime_options

    if "prime_choices" not in options:  # the CLI's default (auto) unless a split is given
        options.update(prime_options(options.pop("prime_ratio", None), options.get("fit", "plain")))
    return _compress(str(model), str(output), CompressOptions(ratio=ratio, method=method, **options),
                     progress=progress, overwrite=overwrite)


def evaluate(model, text=None, *, seqlen: int = 1024, max_windows: int | None = None, device: str = "auto",
             batch_tokens: int | None = None, threads: int | None = None, progress: bool = True):
    """Perplexity of a dense checkpoint or an output on `text` (a file; default: the shipped
    WikiText-2 test split), streamed one block at a time. Returns an evaluate.EvalResult."""
    from sola_stream.evaluation.perplexity import perplexity

    return perplexity(str(model), None if text is None else str(text), seqlen=seqlen, max_windows=max_windows,
                      device=device, batch_tokens=batch_tokens, progress=progress, threads=threads)


def load(path, dtype=None, device="cpu"):
    """A torch CausalLM from a compressed (or dense) sola_stream output directory."""
    from sola_stream.pipeline.loading import load as _load

    return _load(path, dtype=dtype, device=device)
