"""Issue-2 figures through the CLI: tokens/s and tokens per forward per mode at batch 1 and 8, and
the mean time of each forward kind. Usage: python scripts/mode_figures.py MODEL_DIR [MAX_TOKENS]"""

from __future__ import annotations

import json
import re
import subprocess
import sys

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys",
    "class Stack:",
    "for i in range(10):",
    "# Parse the arguments",
    "with open(path) as f:",
    "try:\n    import json",
    "if __name__ == '__main__':",
]


def main() -> None:
    model, max_tokens = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "64"
    print("| mode | batch | tokens/s | tokens/forward | mean ms per forward kind |")
    print("|---|---|---|---|---|")
    for mode in ("ar", "diffusion", "selfspec"):
        for batch in (1, 8):
            cmd = [
                sys.executable,
                "-m",
                "trimode",
                "generate",
                "--model",
                model,
                "--mode",
                mode,
                "--max-tokens",
                max_tokens,
                "--block-length",
                "32",
                "--ignore-eos",
                "--json",
                *PROMPTS[:batch],
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows = [json.loads(line) for line in proc.stdout.splitlines()]
            tps = float(re.search(r"([\d.]+) tokens/s", proc.stderr).group(1))
            tokens = sum(r["num_generated_tokens"] for r in rows)
            forwards = sum(r["num_forwards"] for r in rows)
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in rows[0]["forward_ms"].items())
            print(f"| {mode} | {batch} | {tps:.1f} | {tokens / forwards:.2f} | {kinds} |", flush=True)


if __name__ == "__main__":
    main()
