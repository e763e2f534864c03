"""Greedy agreement of the embedded model in bfloat16 against float32: 200 task prompts, each mode."""

from trimode.bench.suites import task_suite
from trimode.llm import LLM
from trimode.sampling_params import SamplingParams

MODES = ("ar", "selfspec", "diffusion")


def outputs(dtype: str, chats: list[list[dict[str, str]]]) -> dict[str, list[list[int]]]:
    llm = LLM(dtype=dtype, compile=False)
    return {
        m: [o.token_ids for o in llm.chat(chats, SamplingParams(mode=m, max_tokens=48, temperature=0))] for m in MODES
    }


def main() -> None:
    chats = [[{"role": r, "content": c} for r, c in p.messages or ()] for p in task_suite(200)]
    fp32, bf16 = outputs("float32", chats), outputs("bfloat16", chats)
    for m in MODES:
        a, b = fp32[m], bf16[m]
        same = sum(x == y for x, y in zip(a, b))
        # Tokens up to each row's first difference (all of them where the outputs agree).
        prefix = sum(
            next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))) for x, y in zip(a, b)
        )
        print(
            f"{m}: {same}/{len(a)} outputs identical; "
            f"{prefix}/{sum(map(len, a))} fp32 tokens before the first difference"
        )
    print("selfspec == ar within bf16:", bf16["selfspec"] == bf16["ar"])


if __name__ == "__main__":
    main()
