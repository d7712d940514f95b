"""Every diagnostic code in one table: its severity, title, what to do in general, and its anchor in docs/language.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .diagnostics import Diagnostic, Severity, Span

DOC = "docs/language.md"


@dataclass(frozen=True)
class Code:
    code: str
    severity: Severity
    title: str
    help: str

    @property
    def anchor(self) -> str:
        """The anchor of the code's row in docs/language.md."""
        return self.code.lower()

    @property
    def doc(self) -> str:
        return f"{DOC}#{self.anchor}"


CODES: dict[str, Code] = {
    code.code: code
    for code in (
        Code("AS100", Severity.ERROR, "binary, UTF-16 or not valid UTF-8", "save the spec as a UTF-8 text file"),
        Code(
            "AS101",
            Severity.ERROR,
            "unexpected character or token",
            "write the line as 'selector: transform(arguments)'",
        ),
        Code(
            "AS102", Severity.ERROR, "missing `:` after the selector", "put ':' between the selector and the transform"
        ),
        Code("AS103", Severity.ERROR, "space inside a selector", "remove the space, or put ':' before the transform"),
        Code("AS104", Severity.ERROR, "unclosed `(`, `[` or `<`", "close the bracket on the same line"),
        Code(
            "AS105",
            Severity.ERROR,
            "file over 1 MiB, over 10,000 lines, or a line over 4,096 characters",
            "split the spec or the line",
        ),
        Code(
            "AS106", Severity.ERROR, "empty selector or missing transform", "write a module path, ':' and a transform"
        ),
        Code(
            "AS107",
            Severity.ERROR,
            "misplaced `**`, empty segment, nested alternation",
            "write '**' as a whole segment, one '.' between segments, flat alternations",
        ),
        Code(
            "AS201",
            Severity.ERROR,
            "unknown argument",
            "use one of the transform's arguments (lora: r, scale, alpha, rslora, dropout, init, lr_scale, "
            "loraplus, weight_decay)",
        ),
        Code("AS202", Severity.ERROR, "unknown transform", "use lora, dora, tokens, full or none"),
        Code("AS203", Severity.ERROR, "unknown type filter", "use @linear, @switch, @embedding or a class name"),
        Code("AS204", Severity.ERROR, "value of the wrong type", "give the argument a value of its type"),
        Code("AS205", Severity.ERROR, "value out of range", "give the argument a value inside its range"),
        Code("AS206", Severity.ERROR, "both `scale` and `alpha`", "give either scale or alpha"),
        Code("AS207", Severity.ERROR, "`rslora` without `alpha`", "add alpha, or remove rslora"),
        Code(
            "AS208",
            Severity.ERROR,
            "an argument the transform does not take",
            "full takes lr_scale and weight_decay, tokens a row list too, none nothing",
        ),
        Code("AS209", Severity.ERROR, "argument given twice", "keep one of the two"),
        Code(
            "AS210",
            Severity.ERROR,
            "version line not first, or unsupported version",
            "put 'adapterspec 1' on the first line",
        ),
        Code("AS211", Severity.ERROR, "second `defaults` line for one kind", "merge the two defaults lines"),
        Code("AS212", Severity.ERROR, "`defaults` for `full` / `none`", "delete the defaults line"),
        Code("AS213", Severity.ERROR, "slice step 0", "use a step other than 0"),
        Code("AS214", Severity.ERROR, "no rules", "add a rule such as 'layers[*].self_attn.<q,v>_proj: lora'"),
        Code("AS215", Severity.ERROR, "`tokens` without rows", "list the rows: tokens([32000, 32001])"),
        Code(
            "AS301",
            Severity.ERROR,
            "selector matches no module",
            "run 'adapterspec tree MODEL' to see the module paths",
        ),
        Code(
            "AS302",
            Severity.ERROR,
            "selector matches only modules the transform cannot adapt",
            "select linear, switch or embedding modules, or use full",
        ),
        Code(
            "AS304",
            Severity.ERROR,
            "type filter excludes every matched module",
            "remove the type filter or select other modules",
        ),
        Code("AS305", Severity.ERROR, "list position out of range", "use a position inside the list, or a slice"),
        Code("AS306", Severity.WARNING, "r ≥ min(in, out) of a target", "use a smaller r, or full"),
        Code(
            "AS307",
            Severity.WARNING,
            "unanchored selector matches under two prefixes",
            "anchor the selector with '/' and the prefix you mean",
        ),
        Code(
            "AS308",
            Severity.INFO,
            "embedding adapter on a tied embedding also changes the output layer",
            "select @linear modules only to leave it out",
        ),
        Code(
            "AS309",
            Severity.WARNING,
            "a mixture of experts whose experts get no adapter",
            "add a rule for the experts (e.g. '**@experts: lora'), or one that says 'none' for them",
        ),
        Code("AS310", Severity.ERROR, "`full` on quantized weights", "use lora on quantized modules"),
        Code(
            "AS311",
            Severity.INFO,
            "adapter on the router of a mixture of experts",
            "add a 'none' rule for the routers to leave them as they are",
        ),
        Code(
            "AS312",
            Severity.ERROR,
            "token row outside the embedding",
            "list rows below the embedding's number of rows (the vocabulary size)",
        ),
        Code(
            "AS313",
            Severity.ERROR,
            "`tokens` or `init=pissa`/`olora` on quantized weights",
            "use the default or gaussian init on quantized layers, or dequantize the model first",
        ),
        Code(
            "AS314",
            Severity.ERROR,
            "`init=pissa`/`olora` where it cannot apply",
            "use pissa and olora with lora on Linear layers; other adapters take init=default or gaussian",
        ),
        Code(
            "AS315",
            Severity.ERROR,
            "a module whose class cannot take an adapter",
            "leave the module out with a later 'none' rule",
        ),
        Code(
            "AS401",
            Severity.WARNING,
            "a rule that later rules override everywhere",
            "the last matching rule wins; delete the rule or move it down",
        ),
        Code("AS402", Severity.WARNING, "duplicate rule", "delete one of the two lines"),
        Code("AS403", Severity.WARNING, "unused `defaults`", "delete the defaults line"),
        Code(
            "AS404", Severity.WARNING, "`defaults` after the first rule", "move the defaults line above the first rule"
        ),
    )
}


def diagnostic(
    code: str,
    message: str,
    span: Optional[Span] = None,
    help: Optional[str] = None,
    filename: str = "<spec>",
    notes: Sequence[str] = (),
) -> Diagnostic:
    """A diagnostic of a registered code, with the code's severity."""
    return Diagnostic(code, CODES[code].severity, message, span, help, filename, tuple(notes))
