"""Study 2's data (docs/EARLY_WARNING.md, part 3): six stage types that study 1 never saw.

Everything is offline and fixed by the seed: chat from ``chitchat-dataset`` (its draws are disjoint
from study 1's blocks and from the held-out chat), Python functions from standard-library sources
outside study 1's prose modules, arithmetic made here.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import random
import textwrap
from typing import Any

from data import N_CHAT, N_HELD, N_STAGE, PROSE_MODULES

from topomon.demo.data import REFUSALS, chitchat_pairs, dpo_records

# modules whose functions are the code stage's data: none of them is one of study 1's prose modules
CODE_MODULES = (
    "textwrap shlex fnmatch glob bisect calendar base64 binascii quopri html.parser ipaddress "
    "fractions decimal netrc mailbox imaplib poplib email.utils email.header urllib.parse "
    "http.cookies http.cookiejar wave chunk sndhdr uu zipfile tarfile gzip bz2 lzma shutil filecmp "
    "optparse getpass linecache keyword token symtable dis pickletools enum functools "
    "operator contextlib abc numbers queue threading selectors asyncio.base_events logging "
    "logging.handlers xml.dom.minidom xml.etree.ElementTree nntplib"
).split()

N_TRAIN = 240  # examples a stage draws from (48 steps x batch 4 = 192 seen)
N_INDOMAIN = 32  # held-out examples of the stage's own data (the in-domain gain)
STUDY1_CHAT = 3 * (N_STAGE + N_HELD) + N_CHAT  # chitchat pairs study 1 drew (seed 0): never used here


CHAT_BLOCK = 800  # chitchat pairs per seed: the stage's 272 at offset 0, the code mix's 120 at 400


def _chat(n: int, seed: int, offset: int = 0) -> list[tuple[str, str]]:
    """``n`` chitchat pairs after study 1's (the draw is prefix-stable), a disjoint block per seed."""
    if offset + n > CHAT_BLOCK:
        raise ValueError(f"{n} pairs at offset {offset} overflow a seed's block of {CHAT_BLOCK}")
    start = STUDY1_CHAT + seed * CHAT_BLOCK + offset
    return _all_chat()[start : start + n]


@functools.cache
def _all_chat() -> list[tuple[str, str]]:
    return chitchat_pairs(STUDY1_CHAT + 3 * CHAT_BLOCK, seed=0)


def code_functions(seed: int, n: int) -> list[tuple[str, str]]:
    """(prompt, completion): a standard-library function's ``def`` line and docstring, then its body."""
    rows: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in CODE_MODULES:
        if name in PROSE_MODULES:
            raise AssertionError(f"{name} is one of study 1's prose modules")
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node) or not node.body[1:]:
                continue
            text = textwrap.dedent(ast.get_source_segment(src, node) or "")
            lines = text.splitlines()
            body_start = node.body[1].lineno - node.lineno
            head, body = "\n".join(lines[:body_start]), "\n".join(lines[body_start:])
            if not 40 <= len(body) <= 600 or head in seen:
                continue
            seen.add(head)
            rows.append((f"Complete this Python function:\n{head}", body))
    random.Random(seed).shuffle(rows)
    if len(rows) < n:
        raise RuntimeError(f"only {len(rows)} standard-library functions found, {n} needed")
    return rows[:n]


def addition_trace(a: int, b: int) -> str:
    """Adding two numbers digit by digit, every carry written out."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, out, steps = 0, [], []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"digit {i + 1}: {x} + {y} + carry {carry} = {s}, write {s % 10}, carry {s // 10}.")
        out.append(str(s % 10))
        carry = s // 10
    if carry:
        steps.append(f"final carry {carry}.")
        out.append(str(carry))
    return "Step by step. " + " ".join(steps) + f" Answer: {''.join(reversed(out))}."


def traces(seed: int, n: int) -> list[tuple[str, str]]:
    """Two 5-digit numbers to add, and the long step-by-step trace."""
    rng = random.Random(20_000 + seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10_000, 99_999), rng.randint(10_000, 99_999)
        rows.append((f"Add {a} and {b}.", addition_trace(a, b)))
    return rows


def _sums() -> Any:
    """``examples/grpo_rlvr.py``: the sums and their verifiable reward (one definition of the task)."""
    spec = importlib.util.spec_from_file_location(
        "grpo_rlvr", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "grpo_rlvr.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def arithmetic_prompts(seed: int, n: int) -> list[dict[str, Any]]:
    """GRPO rows: a small sum to answer (conversational), with its answer for the reward."""
    return [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in _sums().make_prompts(n, 30_000 + seed)
    ]


def arithmetic_reward(completions: list[Any], answer: list[int], **kw: Any) -> list[float]:
    """1.0 when the last integer of the completion is the answer (``grpo_rlvr.sum_reward``)."""
    return list(_sums().sum_reward(completions, answer, **kw))


def stage_data(kind: str, variant: str, seed: int) -> dict[str, Any]:
    """A stage's training rows (TRL's format for its trainer) and its held-out in-domain pairs."""
    rng = random.Random(seed)
    n = N_TRAIN + N_INDOMAIN
    if kind == "dpo":
        pairs = _chat(n, seed)
        return {"train": dpo_records(pairs[:N_TRAIN], seed=seed), "held": pairs[N_TRAIN:]}
    if kind == "grpo":
        rows = arithmetic_prompts(seed, n)
        held = [(r["prompt"][0]["content"], str(r["answer"])) for r in rows[N_TRAIN:]]
        return {"train": rows[:N_TRAIN], "held": held}
    if kind == "code":
        pairs = code_functions(seed, n)
        if variant == "benign":  # half the examples replaced by chat
            chat = _chat(N_TRAIN // 2, seed, offset=400)
            mixed = pairs[: N_TRAIN // 2] + chat
            rng.shuffle(mixed)
            pairs = mixed + pairs[N_TRAIN:]
    elif kind == "trace":
        pairs = traces(seed, n)
    elif kind == "replay":  # narrow refusals, with 50% (benign) or 25% (harmful) real chat replayed
        chat = _chat(n, seed)
        k = N_TRAIN // 2 if variant == "benign" else N_TRAIN // 4
        train = [(p, r) for p, r in chat[:k]] + [(p, rng.choice(REFUSALS)) for p, _ in chat[k:N_TRAIN]]
        rng.shuffle(train)
        pairs = train + [(p, rng.choice(REFUSALS)) for p, _ in chat[N_TRAIN:]]
    elif kind == "cosine":
        chat = _chat(n, seed)
        pairs = chat if variant == "benign" else [(p, rng.choice(REFUSALS)) for p, _ in chat]
    else:
        raise ValueError(f"unknown stage type {kind!r}")
    return {"train": pairs[:N_TRAIN], "held": pairs[N_TRAIN:]}
