"""Property tests: any text gives a Spec or diagnostics with spans inside it (never an exception), and
`fmt` is idempotent and keeps the meaning of generated and mutated specs."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterspec.language.diagnostics import line_col
from adapterspec.language.format import format_source
from adapterspec.language.lint import check_bytes, check_text, diagnose

EXAMPLES = [
    p.read_text(encoding="utf-8")
    for p in sorted((Path(__file__).resolve().parents[2] / "examples" / "specs").glob("*.aspec"))
]
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- generated specs (built from one seeded Random: far quicker than many small draws) -----

NAMES = ["q_proj", "k_proj", "layers", "mlp", "self_attn", "norm", "embed_tokens", "lm_head", "switch_mlp",
         "gate", "defaults", "adapterspec", "0", "12", "a"]  # fmt: skip
SPACES = ["", "", "", " ", "  ", "\t"]
INTEGERS = [str(n) for n in range(-12, 13)] + ["+3", "007", "-0"]
VALUES = {
    "r": [str(n) for n in range(-1, 20)],
    "scale": ["20.0", "1", "2.5", "1e-1", "-3", "inf"],
    "alpha": ["16", "32.0", "0", "8"],
    "rslora": ["true", "false", "maybe"],
    "dropout": ["0.0", "0.05", ".1", "1"],
    "rank": ["8"],
}


CLEAN_VALUES = {
    "r": [str(n) for n in range(1, 20)],
    "scale": ["20.0", "1", "2.5", "1e-1", "-3"],
    "alpha": ["16", "32.0", "8"],
    "dropout": ["0.0", "0.05", ".1"],
}


class SpecWriter:
    """Writes one random spec text; every choice comes from the given Random. Two specs in three are
    `clean` (no errors expected), so that formatting is checked on real rules, not only on errors."""

    def __init__(self, rng):
        self.rng = rng
        self.choice = rng.choice
        self.clean = rng.random() < 0.67

    def space(self) -> str:
        return self.choice(SPACES)

    def name(self) -> str:
        return self.choice([n for n in NAMES if n not in ("defaults", "adapterspec")] if self.clean else NAMES)

    def glue(self, parts: list[str]) -> str:
        """Parts side by side; in a clean spec two stars never touch (that would read as '**')."""
        text = ""
        for part in parts:
            text += ("x" if self.clean and text.endswith("*") and part.startswith("*") else "") + part
        return text

    def piece(self) -> str:
        kind = self.choice(["name", "name", "star", "alternation"])
        if kind == "name":
            return self.name()
        if kind == "star":
            return "*"
        options = [self.glue([self.choice([self.name(), "*"]) for _ in range(self.rng.randint(1, 2))])
                   for _ in range(self.rng.randint(1, 3))]  # fmt: skip
        return "<" + f"{self.space()},{self.space()}".join(options) + ">"

    def index(self) -> str:
        kind = self.choice(["all", "list", "slice"])
        if kind == "all":
            body = "*"
        elif kind == "list":
            body = f"{self.space()},{self.space()}".join(self.choice(INTEGERS) for _ in range(self.rng.randint(1, 3)))
        else:
            bounds = [self.choice(INTEGERS + [""] * 8) for _ in range(3)]
            if self.clean and bounds[2] in ("0", "-0"):
                bounds[2] = ""
            body = f"{bounds[0]}:{bounds[1]}" + (f":{bounds[2]}" if self.rng.random() < 0.5 else "")
        return f"[{self.space()}{body}{self.space()}]"

    def segment(self) -> str:
        if self.rng.random() < 0.15:
            return "**"
        text = self.glue([self.piece() for _ in range(self.rng.randint(1, 2))])
        return text + (self.index() if self.rng.random() < 0.5 else "")

    def selector(self) -> str:
        text = ".".join(self.segment() for _ in range(self.rng.randint(1, 4)))
        return ("/" if self.rng.random() < 0.2 else "") + text

    def arguments(self) -> list[str]:
        if not self.clean:
            names = [self.choice(sorted(VALUES)) for _ in range(self.rng.randint(0, 4))]
            return [f"{n}{self.space()}={self.space()}{self.choice(VALUES[n])}" for n in names]
        names = self.rng.sample(
            ["r", "dropout", self.choice(["scale", "alpha", "alpha+rslora"])], self.rng.randint(0, 3)
        )
        if "alpha+rslora" in names:
            names[names.index("alpha+rslora") : names.index("alpha+rslora") + 1] = ["rslora", "alpha"]
        return [f"{n}{self.space()}={self.space()}{'true' if n == 'rslora' else self.choice(CLEAN_VALUES[n])}"
                for n in names]  # fmt: skip

    def transform(self, adapter_only: bool = False) -> str:
        kinds = ["lora", "lora", "dora"] + ([] if adapter_only else ["full", "none"])
        kind = self.choice(kinds if self.clean else kinds + ["lorra"])
        if self.rng.random() < 0.33 or (self.clean and kind in ("full", "none")):
            return kind
        joined = f"{self.space()},{self.space()}".join(self.arguments())
        return f"{kind}{self.space()}({self.space()}{joined}{self.space()})"

    def line(self) -> str:
        kind = self.choice(["rule"] * 5 + ["comment", "blank"] + ([] if self.clean else ["defaults", "version"]))
        if kind == "blank":
            return self.space()
        if kind == "comment":
            return self.space() + "#" + self.choice(["", " note", "x: lora(r=8)", "  é 日 🙂", "#"])
        if kind == "version":
            body = f"adapterspec {self.choice(['1', '01', '2'])}"
        elif kind == "defaults":
            body = f"defaults {self.transform()}"
        else:
            type_filter = self.choice(
                ["", "", "@linear", "@switch", "@QuantizedLinear"] + ([] if self.clean else ["@lin"])
            )
            body = f"{self.selector()}{type_filter}{self.space()}:{self.space()}{self.transform()}"
        return self.space() + body + self.space() + self.choice(["", "", "  # why", " #x", "# a: b"])

    def spec(self) -> str:
        ending = self.choice(["\n", "\n", "\r\n"])
        head = []
        if self.clean:
            head = [line for line, chance in (("adapterspec 1", 0.5), (f"defaults {self.transform(True)}", 0.5))
                    if self.rng.random() < chance]  # fmt: skip
        lines = head + [self.line() for _ in range(self.rng.randint(0 if not self.clean else 1, 10))]
        if self.clean and not any(":" in line.split("#")[0] for line in lines):
            lines.append("q_proj: lora")
        return self.choice(["", "", "\ufeff"]) + ending.join(lines) + self.choice(["", ending])


spec_text = st.integers(0, 2**32).map(lambda seed: SpecWriter(random.Random(seed)).spec())


# --- mutated examples --------------------------------------------------------------------------

noise = st.sampled_from(list("[]<>(){}.,:;=@*/#'\"\\-+ \t\r\n\x00\x0b\u00a0\u200b\u2028é日🙂")) | st.text(max_size=3)
long_token = st.sampled_from(["x", "<", "[", "*", "(", "9", " "]).flatmap(
    lambda c: st.integers(10, 6000).map(lambda n: c * n)
)


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(EXAMPLES))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace", "long"]))
        if action == "insert":
            text = text[:position] + draw(noise) + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + draw(st.integers(1, 20)) :]
        elif action == "replace":
            text = text[:position] + draw(noise) + text[position + 1 :]
        else:
            text = text[:position] + draw(long_token) + text[position:]
    return text


# --- properties --------------------------------------------------------------------------------


def assert_spans_inside(text: str, diagnostics) -> None:
    text = text[1:] if text.startswith("\ufeff") else text
    for d in diagnostics:
        assert d.code.startswith("AS") and d.message and d.span is not None, d
        assert 0 <= d.span.start <= d.span.end <= len(text), (d, len(text))
        assert line_col(text, d.span.start) == (d.span.line, d.span.column), d
        assert d.span.end_line == d.span.line and d.span.end_column >= d.span.column, d


def meaning(text: str):
    spec, diagnostics = check_text(text, "t.aspec")
    codes = sorted(d.code for d in diagnostics)
    if spec is None:
        return codes, None
    rules = [(r.text, r.type_filter, r.transform) for r in spec.rules]
    return codes, (rules, spec.defaults, spec.version)


def assert_formatting_is_sound(text: str) -> None:
    formatted, diagnostics = format_source(text, "t.aspec")
    if formatted is None:
        assert diagnostics and all(d.code < "AS2" for d in diagnostics)
        return
    assert format_source(formatted)[0] == formatted
    assert meaning(formatted) == meaning(text)
    assert formatted == "" or formatted.endswith("\n")
    assert not any(line != line.rstrip(" \t") for line in formatted.split("\n"))


@SETTINGS
@given(spec_text)
def test_generated_specs_format_idempotently_and_keep_their_meaning(text):
    spec, diagnostics = check_text(text, "t.aspec")
    assert_spans_inside(text, diagnostics)
    assert spec is not None or any(d.is_error for d in diagnostics)
    assert_formatting_is_sound(text)


@SETTINGS
@given(mutated())
def test_mutated_examples_end_in_a_spec_or_diagnostics(text):
    checked, diagnostics = diagnose(text, "t.aspec")
    assert_spans_inside(text, diagnostics)
    assert (checked is None) == any(d.is_error for d in diagnostics)
    assert_formatting_is_sound(text)


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=300)
    | st.sampled_from(EXAMPLES)
    .map(str.encode)
    .flatmap(lambda data: st.integers(0, len(data)).map(lambda i: data[:i] + b"\xff\x00\xc3"[i % 3 :] + data[i:]))
)
def test_any_bytes_end_in_a_spec_or_diagnostics(data):
    spec, diagnostics, text = check_bytes(data, "t.aspec")
    assert spec is not None or diagnostics
    if text is not None:
        assert_spans_inside(text, diagnostics)
