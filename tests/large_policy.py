"""Generated large policies (issue 8 item 17): N concepts as inline YAML floats or rows of a file.

Used by tests/test_policy_scale.py; run it by hand to time loading and compiling at any size:

    .venv/bin/python tests/large_policy.py 100000 --dim 32 --kind inline
    .venv/bin/python tests/large_policy.py 100000 --dim 32 --kind file
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """[n, dim] float32 random directions, each written with 6 decimals in YAML."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def write_inline(folder: Path, n: int, dim: int = 32) -> Path:
    """A policy of n concepts, each with its own `embedding: [..dim floats..]` in the YAML."""
    rows = vectors(n, dim)
    lines = ["policy: large-inline", "version: 1", "concepts:"]
    for i, row in enumerate(rows):
        floats = ", ".join(f"{v:.6f}" for v in row.tolist())
        lines.append(f"  - {{name: c{i}, embedding: [{floats}], threshold: 0.2}}")
    path = folder / "large-inline.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_with_file(folder: Path, n: int, dim: int = 32) -> Path:
    """The same concepts as rows of one embeddings file the YAML refers to."""
    from safetensors.numpy import save_file

    save_file({"concepts": vectors(n, dim)}, str(folder / "large.safetensors"))
    lines = ["policy: large-file", "version: 1", "concepts:"]
    for i in range(n):
        lines.append(
            f"  - {{name: c{i}, embedding: {{file: large.safetensors, tensor: concepts,"
            f" row: {i}}}, threshold: 0.2}}"
        )
    path = folder / "large-file.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class VectorEncoder:
    """A PolicyEncoder without towers: enough to compile embedding-only policies."""

    def __init__(self, dim: int) -> None:
        self.model_id = "vectors-only"
        self.embed_dim = dim
        self.text_fingerprint = None

    def encode_text(self, prompts):
        from policy.encoding import EncodingError

        raise EncodingError("no text tower")

    def checkpoint_tensor(self, name):
        from policy.encoding import EncodingError

        raise EncodingError(f"no tensor {name!r}")

    def prompt_tokens(self, prompt):
        from policy.encoding import EncodingError

        raise EncodingError("no text tower")


def main(argv: list[str]) -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--kind", choices=("inline", "file"), default="inline")
    args = parser.parse_args(argv)
    from policy import compile_policy, load_policy

    with tempfile.TemporaryDirectory() as tmp:
        write = write_inline if args.kind == "inline" else write_with_file
        path = write(Path(tmp), args.n, args.dim)
        # CPU seconds as well as wall seconds: on a shared machine the wall clock mostly
        # measures the neighbours.
        clocks = [(time.perf_counter(), time.process_time())]
        policy = load_policy(path)
        clocks.append((time.perf_counter(), time.process_time()))
        compiled = compile_policy(policy, VectorEncoder(args.dim), cache=False)
        clocks.append((time.perf_counter(), time.process_time()))
    (w0, c0), (w1, c1), (w2, c2) = clocks
    print(
        f"{args.kind}: {args.n} concepts x {args.dim}: load+validate {w1 - w0:.2f} s wall"
        f" ({c1 - c0:.2f} s CPU), compile {w2 - w1:.2f} s wall ({c2 - c1:.2f} s CPU),"
        f" {len(compiled.concept_names)} concepts compiled"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
