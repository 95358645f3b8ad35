"""A task suite per agent role: does this model do the role's job well enough, how often?

Why: KLD says how far a quantization moved from its reference, not whether either is good at the
work. Each task is a prompt a role really gets, judged by what an answer must contain (keywords),
its length, and, with the optional embeddings extra, its meaning (similarity to a reference
answer). Run over several sampled iterations, the figure that decides is the success rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..types import Generator

_REVIEW_SNIPPET = '''
def find_user(db, name):
    query = "SELECT * FROM users WHERE name = '" + name + "'"
    return db.execute(query).fetchall()

def greet(request):
    return "<h1>Hello " + request.args["name"] + "</h1>"
'''


@dataclass(frozen=True)
class Task:
    role: str
    name: str
    prompt: str
    keywords: tuple[str, ...]
    min_chars: int
    reference: str = ""  # a good answer, for semantic similarity
    min_keyword_fraction: float = 1.0


TASKS: tuple[Task, ...] = (
    Task("researcher", "agent-frameworks", "Research latest AI agent frameworks",
         ("langchain", "autogen", "crewai", "reasoning"), 200,
         "Current AI agent frameworks include LangChain (chains, tools and memory around LLM calls), "
         "Microsoft AutoGen (multi-agent conversations between assistant and user-proxy agents) and "
         "CrewAI (role-based crews of agents with tasks). They differ in how they orchestrate "
         "reasoning, tool use and planning; all rely on the model's reasoning quality."),
    Task("coder", "binary-search", "Write Python function for binary search",
         ("def", "binary_search", "left", "right", "mid"), 100,
         "def binary_search(items, target):\n    left, right = 0, len(items) - 1\n"
         "    while left <= right:\n        mid = (left + right) // 2\n"
         "        if items[mid] == target:\n            return mid\n"
         "        if items[mid] < target:\n            left = mid + 1\n        else:\n"
         "            right = mid - 1\n    return -1"),
    Task("reviewer", "security-review", "Review code for security vulnerabilities\n" + _REVIEW_SNIPPET,
         ("sql injection", "xss", "validation", "sanitize"), 150,
         "find_user builds SQL by string concatenation: SQL injection; use parameterised queries. "
         "greet echoes user input into HTML: cross-site scripting (XSS); escape or sanitize output. "
         "Add input validation for the name parameter in both functions."),
    Task("tester", "pytest-add", "Write pytest unit tests for a Python function add(a, b) that "
         "returns the sum of two numbers.", ("def test_", "assert", "add("), 100,
         "import pytest\n\ndef test_add_integers():\n    assert add(2, 3) == 5\n\n"
         "def test_add_negative():\n    assert add(-1, 1) == 0\n\ndef test_add_floats():\n"
         "    assert add(0.1, 0.2) == pytest.approx(0.3)"),
    Task("coordinator", "plan-split", "Split the job 'build a command-line weather app' into steps "
         "and assign each step to one of: researcher, coder, tester, reviewer.",
         ("researcher", "coder", "tester", "reviewer"), 150,
         "1. Researcher: compare weather APIs and their terms. 2. Coder: write the CLI that calls the "
         "chosen API and formats the forecast. 3. Tester: write tests with recorded API responses. "
         "4. Reviewer: review error handling, API-key storage and input validation."),
)


@dataclass(frozen=True)
class TaskResult:
    model: str
    role: str
    task: str
    iterations: int
    success_rate: float
    keyword_coverage: float  # mean fraction of keywords found
    mean_chars: float
    similarity: float | None  # mean cosine similarity to the reference answer
    missing: dict[str, int] = field(default_factory=dict)  # keyword -> iterations it was absent


@dataclass(frozen=True)
class Verdict:
    passed: bool
    coverage: float
    chars: int
    similarity: float | None
    missing: tuple[str, ...]


def judge(task: Task, answer: str, similarity: Callable[[str, str], float] | None = None,
          min_similarity: float = 0.5) -> Verdict:
    """Keywords (case-insensitive), length, and meaning when a similarity function is given."""
    lower = answer.lower()
    missing = tuple(k for k in task.keywords if k.lower() not in lower)
    coverage = 1 - len(missing) / len(task.keywords) if task.keywords else 1.0
    sim = similarity(answer, task.reference) if similarity and task.reference and answer else None
    passed = (coverage >= task.min_keyword_fraction and len(answer) >= task.min_chars
              and (sim is None or sim >= min_similarity))
    return Verdict(passed, coverage, len(answer), sim, missing)


def run_tasks(gen: Generator, tasks: Sequence[Task] = TASKS, *, iterations: int = 3,
              temperature: float = 0.7, max_tokens: int = 384,
              similarity: Callable[[str, str], float] | None = None, min_similarity: float = 0.5,
              roles: Sequence[str] | None = None, model: str | None = None) -> list[TaskResult]:
    """Each task ``iterations`` times as a chat turn (seeded, so a rerun repeats itself)."""
    results = []
    for task in tasks:
        if roles and task.role not in roles:
            continue
        verdicts = []
        for i in range(iterations):
            answer = gen.chat([{"role": "user", "content": task.prompt}], max_tokens=max_tokens,
                              temperature=temperature, seed=1000 + i).text
            verdicts.append(judge(task, answer, similarity, min_similarity))
        sims = [v.similarity for v in verdicts if v.similarity is not None]
        missing: dict[str, int] = {}
        for v in verdicts:
            for k in v.missing:
                missing[k] = missing.get(k, 0) + 1
        results.append(TaskResult(
            model=model or getattr(gen, "name", "model"), role=task.role, task=task.name,
            iterations=iterations, success_rate=sum(v.passed for v in verdicts) / iterations,
            keyword_coverage=sum(v.coverage for v in verdicts) / iterations,
            mean_chars=sum(v.chars for v in verdicts) / iterations,
            similarity=sum(sims) / len(sims) if sims else None, missing=missing))
    return results
