"""Fidelity tasks generated from templates, word lists and a seed (nothing is downloaded).

Every task is a prefix, T threads and a join, as token ids, plus the teacher-forced continuations
(*targets*) after the join that the rows are scored on:

* ``reading`` (`reading_task`): each thread is one short document of facts about one person (name,
  job, city, birth year, ...); the join asks about one fact of one document and starts the answer
  ("Ilse Marsh works in"). Targets: the candidate answers (" Lisbon", ...): the value of that fact
  in every document plus distractors, ``NUM_CANDIDATES`` in all; ``gold`` is the right one. Needs
  a tokenizer (the chat template is used when the tokenizer has one).
* ``branches`` (`branches_task`): the model itself writes T continuations of one question (sampled
  with the seed, or greedy after a distinct "Approach i:" header); the join asks for a summary and
  the final answer. Target: the text merge's own greedy continuation of ``cont`` tokens. Without a
  tokenizer (stories260K) the prefix, threads and join are token ids the model samples.
* ``memory`` (`memory_task`): the documents of a reading task, each saved as a memory block from a
  context of its own (``contexts[i]``: a different conversation's preamble) and inserted one after
  another at other positions of the reading prefix. Targets as ``reading``; without a tokenizer,
  sampled ids and the ``branches`` target.

Same arguments, same seed: the same task, token for token (the ``branches`` and tokenizer-less
tasks also depend on the model, which writes them). The text merge of a task is
``prefix + threads[0] + ... + threads[T-1] + join``.
"""

from __future__ import annotations

import dataclasses
import random

import torch

__all__ = ["Task", "reading_task", "branches_task", "memory_task", "make_task", "text_merge_ids", "generate",
           "KINDS", "NUM_CANDIDATES"]

KINDS = ("reading", "branches", "memory")
NUM_CANDIDATES = 12

FIRST = ("Ilse", "Tomas", "Amara", "Kenji", "Lucia", "Oskar", "Priya", "Mateo", "Sana", "Viktor", "Nadia", "Emil",
         "Zofia", "Rafael", "Ingrid", "Darius", "Leila", "Anton", "Mirela", "Hugo", "Yara", "Felix", "Noor", "Bruno")
LAST = ("Marsh", "Okafor", "Lindqvist", "Tanaka", "Moreau", "Petrov", "Haddad", "Quinn", "Novak", "Brennan", "Sato",
        "Duarte", "Keller", "Abara", "Voss", "Castillo", "Horvat", "Nakamura", "Ferreira", "Kowalski")
CITIES = ("Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Madrid", "Nairobi", "Prague", "Seoul", "Berlin",
          "Toronto", "Athens", "Warsaw", "Mumbai", "Chicago", "Sydney", "Havana", "Bangkok", "Helsinki", "Boston",
          "Manila", "Denver", "Naples")
JOBS = ("baker", "pilot", "nurse", "lawyer", "farmer", "dentist", "chef", "teacher", "plumber", "painter", "banker",
        "librarian", "carpenter", "surgeon", "journalist", "gardener", "tailor", "mechanic", "architect", "florist")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink", "grey", "gold")
PETS = ("cats", "dogs", "rabbits", "parrots", "goldfish", "horses", "turtles", "hamsters")
INSTRUMENTS = ("piano", "violin", "guitar", "flute", "drums", "cello", "trumpet", "harp")

# question -> (attribute, the answer's start, candidate pool)
QUESTIONS = {
    "city": ("In which city does {name} work?", "{name} works in", CITIES),
    "job": ("What is the job of {name}?", "{name} works as a", JOBS),
    "year": ("In which year was {name} born?", "{name} was born in", tuple(str(y) for y in range(1940, 2000))),
}

CONTEXTS = ("Here is a note from my files that I want you to keep for later.",
            "My colleague sent me this record this morning.",
            "I copied the following entry from an old address book.",
            "This is one of the cards from the office archive.",
            "A friend asked me to remember this for her.",
            "The following line was on the back of a postcard.",
            "I found this paragraph in a report.",
            "This came up in yesterday's meeting notes.")

PROBLEMS = (
    "A shop sells {a} apples on Monday and {b} apples on Tuesday. Each apple costs {c} dollars. "
    "How much money did the shop make on the two days?",
    "A train travels {a} kilometres in the morning and {b} kilometres in the afternoon, for {c} days. "
    "How far does it travel in total?",
    "Maria has {a} books. She buys {b} more every month for {c} months. How many books does she have then?",
    "A garden has {a} rows of {b} tulips and {c} rows of roses with {b} roses each. How many flowers are there?",
    "A school has {a} classes of {b} pupils. {c} pupils are ill today. How many pupils are at school?",
)
PROBLEM_NUMBERS = dict(a=(3, 40), b=(2, 12), c=(2, 9))  # the ranges the problems' numbers are drawn from


@dataclasses.dataclass
class Task:
    """One fidelity instance. Token ids are int64 CPU tensors.

    kind, seed: how it was made. prefix ``[P]``; threads: ``T`` tensors ``[n_i]`` (each sees the prefix
    and itself); join ``[J >= 1]`` (sees everything before it). targets: continuations after the join,
    teacher-forced, each ``[m >= 1]``. gold: index of the right answer among ``targets`` (reading,
    memory) or None (no answer score). kl_target: the target whose positions KL and top-1 agreement
    are measured on (the gold answer, or the single continuation). contexts (memory only): the ids
    each thread was encoded after when it was saved as a block (it sees them, not the prefix).
    text: the readable pieces (for reports; empty without a tokenizer).
    """

    kind: str
    seed: int
    prefix: torch.Tensor
    threads: list[torch.Tensor]
    join: torch.Tensor
    targets: list[torch.Tensor]
    gold: int | None = None
    kl_target: int = 0
    contexts: list[torch.Tensor] | None = None
    text: dict = dataclasses.field(default_factory=dict)

    @property
    def num_threads(self) -> int:
        return len(self.threads)


def text_merge_ids(task: Task) -> torch.Tensor:
    """``prefix + threads + join``: the token sequence the text merge runs one causal pass over."""
    return torch.cat([task.prefix, *task.threads, task.join])


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


MARK = "\x00THREADS\x00"


def _chat_pieces(tok, messages: list[dict], answer_start: str = "") -> list[str]:
    """``messages`` rendered through the tokenizer's chat template (generation prompt added; without a
    template, the contents one per line), then ``answer_start``, split at every `MARK` in the contents:
    the threads go where the marks were."""
    if getattr(tok, "chat_template", None):
        full = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        full = "\n".join(m["content"] for m in messages) + "\n"
    return (full + answer_start).split(MARK)


def _people(rng: random.Random, n: int) -> list[dict]:
    firsts, lasts = rng.sample(FIRST, n), rng.sample(LAST, n)
    cities, jobs = rng.sample(CITIES, n), rng.sample(JOBS, n)
    years = rng.sample(range(1940, 2000), n)
    return [dict(name=f"{f} {last}", city=c, job=j, year=str(y), colour=rng.choice(COLOURS),
                 pets=rng.randint(2, 9), pet=rng.choice(PETS), instrument=rng.choice(INSTRUMENTS))
            for f, last, c, j, y in zip(firsts, lasts, cities, jobs, years)]


def _document(i: int, p: dict) -> str:
    return (f"Document {i + 1}: {p['name']} works as a {p['job']} in {p['city']}. {p['name']} was born in "
            f"{p['year']}, has {p['pets']} {p['pet']} and plays the {p['instrument']}. The favourite colour of "
            f"{p['name']} is {p['colour']}.\n\n")


def _reading_parts(tok, T: int, seed: int):
    rng = random.Random(f"reading-{T}-{seed}")
    people = _people(rng, T)
    docs = [_document(i, p) for i, p in enumerate(people)]
    attr = rng.choice(sorted(QUESTIONS))
    asked = rng.randrange(T)
    question, answer_start, pool = QUESTIONS[attr]
    name = people[asked]["name"]
    content = f"Read the documents below, then answer the question.\n\n{MARK}Question: {question.format(name=name)}"
    before, after = _chat_pieces(tok, [{"role": "user", "content": content}], answer_start.format(name=name))
    values = [p[attr] for p in people]
    others = [v for v in pool if v not in values]
    cands = values + rng.sample(others, NUM_CANDIDATES - T)
    rng.shuffle(cands)
    gold = cands.index(values[asked])
    text = dict(prefix=before, threads=docs, join=after, candidates=cands, question=question.format(name=name))
    return before, docs, after, cands, gold, text


def reading_task(tok, T: int, seed: int) -> Task:
    """A parallel-reading task: T documents (one per thread), a question about one of them.

    Scores (see `kvfuse.fidelity.score.answer_scores`): the gold answer's log-likelihood, its rank
    among the ``NUM_CANDIDATES`` candidates, greedy exact match. ``T`` must be at most 8 (distinct
    names and values come from the word lists).
    """
    if tok is None:
        raise ValueError("reading_task needs a tokenizer (a checkpoint without one, e.g. stories260K, has no text)")
    if not 1 <= T <= 8:
        raise ValueError(f"reading_task: T must be in 1..8, got {T}")
    before, docs, after, cands, gold, text = _reading_parts(tok, T, seed)
    return Task("reading", seed, _ids(tok, before), [_ids(tok, d) for d in docs], _ids(tok, after),
                [_ids(tok, " " + c) for c in cands], gold=gold, kl_target=gold, text=text)


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model.forward`` (`kvfuse.integrations.hf.cache_kwargs`)."""
    from kvfuse.integrations.hf import cache_kwargs as _cache_kwargs

    return _cache_kwargs(model, cache)


@torch.no_grad()
def generate(model, ids: torch.Tensor, n: int, *, gen: torch.Generator | None = None, temperature: float = 0.8,
             stop: tuple[int, ...] = ()):
    """Up to ``n`` new token ids after ``ids`` by plain causal decoding with a ``DynamicCache``: sampled
    at ``temperature`` from ``gen`` (a CPU ``torch.Generator``), or greedy with ``gen=None``; a row
    ends before its first token of ``stop``.

    ``ids``: int64 ``[L]`` -> int64 ``[<= n]``; or ``[B, L]`` (rows decoded as one batch) -> a list of
    ``B`` such tensors. Results are on the CPU.
    """
    from transformers import DynamicCache

    rows = ids.dim() == 2
    x = (ids if rows else ids[None]).to(model.device)
    B, pos = x.shape[0], 0
    cache = DynamicCache(config=model.config)
    out = torch.empty(B, 0, dtype=torch.int64)
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(n):
        logits = model(input_ids=x, position_ids=torch.arange(pos, pos + x.shape[1], device=x.device).expand(B, -1),
                       use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1].float().cpu()
        pos += x.shape[1]
        t = logits.argmax(-1) if gen is None else \
            torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0]
        done |= torch.isin(t, torch.tensor(stop, dtype=torch.int64))
        out = torch.cat([out, torch.where(done, -1, t)[:, None]], 1)
        if bool(done.all()):
            break
        x = t[:, None].to(x.device)
    res = [r[: int((r < 0).nonzero()[0]) if bool((r < 0).any()) else r.numel()] for r in out]
    return res if rows else res[0]


def _stop_ids(tok) -> tuple[int, ...]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for s in ("<|im_end|>", "<|endoftext|>"):
        i = tok.convert_tokens_to_ids(s)
        if isinstance(i, int) and i != tok.unk_token_id:
            ids.add(i)
    return tuple(ids)


def _sampled_ids_task(model, kind: str, T: int, seed: int, *, thread_len: int, cont: int, sample: bool):
    """Prefix, threads and join sampled from a tokenizer-less model (BOS = 1, then sampled ids)."""
    gen = torch.Generator().manual_seed(seed * 1009 + T)
    bos = torch.tensor([1])
    prefix = torch.cat([bos, generate(model, bos, 31, gen=gen)])
    contexts = None
    if kind == "memory":
        contexts = [torch.cat([bos, generate(model, bos, 15, gen=gen)]) for _ in range(T)]
        threads = [generate(model, c, thread_len, gen=gen) for c in contexts]
    elif sample:
        threads = [generate(model, prefix, thread_len, gen=gen) for _ in range(T)]
    else:  # greedy threads from T distinct first tokens
        firsts = (torch.randperm(model.config.vocab_size - 3, generator=gen)[:T] + 3).tolist()
        threads = [torch.cat([torch.tensor([t]), generate(model, torch.cat([prefix, torch.tensor([t])]),
                                                          thread_len - 1)]) for t in firsts]
    ctx = torch.cat([prefix, *threads])
    join = generate(model, ctx, 4, gen=gen)
    target = generate(model, torch.cat([ctx, join]), cont)
    return Task(kind, seed, prefix, threads, join, [target], contexts=contexts)


def branches_task(model, tok, T: int, seed: int, *, thread_len: int = 48, cont: int = 32, sample: bool = True) -> Task:
    """A parallel-reasoning task: T continuations the model writes of one question; the join asks for
    a summary and the final answer. Target: the text merge's greedy continuation of ``cont`` tokens.

    Threads: ``"Approach i: "`` then up to ``thread_len`` tokens the model writes seeing the prefix
    and its own header (sampled at temperature 0.8 from the seed, or greedy with ``sample=False``),
    then a blank line. Scores: KL and top-1 agreement over the target (`kvfuse.fidelity.score`).
    ``tok=None``: every piece is sampled token ids (greedy threads then start from distinct tokens).
    """
    if tok is None:
        return _sampled_ids_task(model, "branches", T, seed, thread_len=thread_len, cont=cont, sample=sample)
    rng = random.Random(f"branches-{T}-{seed}")
    problem = rng.choice(PROBLEMS).format(**{k: rng.randint(*v) for k, v in PROBLEM_NUMBERS.items()})
    msgs = [{"role": "user", "content": problem + " Think about it in several different ways."},
            {"role": "assistant", "content": MARK},
            {"role": "user", "content": "Summarize the approaches above in two sentences and give the final answer."}]
    prefix_text, join_text = _chat_pieces(tok, msgs)
    prefix = _ids(tok, prefix_text)
    gen = torch.Generator().manual_seed(seed * 1009 + T) if sample else None
    stop = _stop_ids(tok)
    headers = [_ids(tok, f"Approach {i + 1}: ") for i in range(T)]
    if len({h.numel() for h in headers}) == 1:  # all threads as one batch
        bodies = generate(model, torch.stack([torch.cat([prefix, h]) for h in headers]), thread_len, gen=gen,
                          stop=stop)
    else:
        bodies = [generate(model, torch.cat([prefix, h]), thread_len, gen=gen, stop=stop) for h in headers]
    threads = [torch.cat([h, b, _ids(tok, "\n\n")]) for h, b in zip(headers, bodies)]
    texts = [tok.decode(t) for t in threads]
    join = _ids(tok, join_text)
    target = generate(model, torch.cat([prefix, *threads, join]), cont)
    text = dict(prefix=tok.decode(prefix), threads=texts, join=join_text, target=tok.decode(target))
    return Task("branches", seed, prefix, threads, join, [target], text=text)


def memory_task(model, tok, T: int, seed: int, *, thread_len: int = 48, cont: int = 32) -> Task:
    """The documents of ``reading_task(tok, T, seed)`` as memory blocks: document i was encoded after
    ``contexts[i]`` (a preamble of its own conversation, chat-formatted), saved, and is inserted into
    the reading prefix after document i-1; then the reading join. Scores as `reading_task`.
    ``tok=None``: sampled ids (``model`` writes contexts, blocks, join and the greedy target)."""
    if tok is None:
        return _sampled_ids_task(model, "memory", T, seed, thread_len=thread_len, cont=cont, sample=True)
    task = reading_task(tok, T, seed)
    contexts = []
    for i in range(T):
        pre = CONTEXTS[(seed + i) % len(CONTEXTS)] + "\n\n" + MARK
        contexts.append(_ids(tok, _chat_pieces(tok, [{"role": "user", "content": pre}])[0]))
    task.kind, task.contexts = "memory", contexts
    task.text["contexts"] = [tok.decode(c) for c in contexts]
    return task


def make_task(kind: str, model, tok, T: int, seed: int, **kwargs) -> Task:
    """`reading_task`, `branches_task` or `memory_task` by name (``kwargs``: thread_len, cont, sample)."""
    if kind == "reading":
        return reading_task(tok, T, seed)
    if kind == "branches":
        return branches_task(model, tok, T, seed, **kwargs)
    if kind == "memory":
        kwargs.pop("sample", None)
        return memory_task(model, tok, T, seed, **kwargs)
    raise ValueError(f"unknown task kind {kind!r}; choose from {', '.join(KINDS)}")
