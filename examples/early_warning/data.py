"""The early-warning study's data (docs/EARLY_WARNING.md, part 1): stages, held-out sets, the fresh task.

Everything is offline: chat from the ``chitchat-dataset`` package, prose from Python's own standard
library. Every set is disjoint from the others and fixed by the seed.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

from topomon.demo.data import REFUSALS, chitchat_pairs

# 64 standard-library modules with a docstring of at least 60 words, in every Python >= 3.10
PROSE_MODULES = (
    "argparse ast builtins cmd codeop collections colorsys compileall configparser copy csv dbm difflib "
    "doctest encodings errno fileinput ftplib gc getopt gettext grp hashlib heapq inspect io itertools "
    "json locale marshal mimetypes os pdb plistlib posixpath pprint pwd pyclbr pydoc random re "
    "rlcompleter sched shelve site smtplib socket socketserver sqlite3 ssl statistics string struct "
    "subprocess tabnanny tempfile termios time timeit tokenize trace typing unittest uuid"
).split()

WORDS = (
    "apple river stone cloud music paper window garden silver yellow market bridge candle forest "
    "letter mountain orange pencil rabbit summer table violin winter basket doctor engine farmer "
    "guitar island jacket kitten lemon mirror needle ocean pillow rocket sugar tiger umbrella wagon"
).split()

N_STAGE, N_HELD, N_CHAT, N_PROSE, N_TASK = 200, 32, 64, 64, 64


def prose(n: int = N_PROSE) -> list[str]:
    """The out-of-domain prose: the docstrings of ``n`` standard-library modules (first 1200 characters)."""
    out = []
    for name in PROSE_MODULES:
        try:
            doc = importlib.import_module(name).__doc__ or ""
        except ImportError:  # a platform without it (pwd, grp, termios on Windows)
            continue
        doc = " ".join(doc.split())
        if len(doc.split()) >= 60:
            out.append(doc[:1200])
        if len(out) == n:
            break
    return out


def reverse_task(n: int, seed: int) -> list[tuple[str, str]]:
    """The plasticity task, never seen by any stage: reverse a list of 4-7 words."""
    rng = random.Random(10_000 + seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(4, 7))
        rows.append((f"Reverse: {' '.join(words)}", " ".join(reversed(words))))
    return rows


def splits(seed: int, narrow: bool) -> dict[str, Any]:
    """The stage's training and held-out pairs, the held-out chat, the plasticity task (train, held-out).

    The chitchat pairs are drawn once (seed 0) and split into fixed disjoint blocks: 3 x 232 stage
    blocks (one per seed), then 64 held-out chat pairs shared by every stage.
    """
    if seed not in (0, 1, 2):
        raise ValueError(f"the study's seeds are 0, 1, 2; got {seed}")
    pairs = chitchat_pairs(3 * (N_STAGE + N_HELD) + N_CHAT, seed=0)
    block = pairs[seed * (N_STAGE + N_HELD) : (seed + 1) * (N_STAGE + N_HELD)]
    chat = pairs[3 * (N_STAGE + N_HELD) :]
    rng = random.Random(seed)
    if narrow:
        block = [(p, rng.choice(REFUSALS)) for p, _ in block]
    task = reverse_task(N_TASK, seed)
    return {
        "train": block[:N_STAGE],
        "held": block[N_STAGE:],
        "chat": chat,
        "task_train": task[: N_TASK // 2],
        "task_held": task[N_TASK // 2 :],
    }


def render(tok: Any, prompt: str, reply: str) -> tuple[str, str]:
    """(prompt text, completion text) in the model's chat template, or ``User:``/``Assistant:`` lines."""
    if getattr(tok, "chat_template", None):
        head = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return head, reply + (tok.eos_token or "")
    return f"User: {prompt}\nAssistant:", f" {reply}" + (tok.eos_token or "")
