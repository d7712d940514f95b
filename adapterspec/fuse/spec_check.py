"""`python -m adapterspec.fuse.spec_check MODEL_DIR ADAPTER_DIR`: the adapter directory's spec planned on the model and
checked against its saved plan (`plan_of`), in a process beside a fuse; prints the spec plan's modules, or the
UserError, as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UserError


def main(model_dir: str, adapter_dir: str) -> int:
    from ..model.adapter_format import plan_of, read_adapter_config
    from ..model.index import ModuleIndex

    directory = Path(adapter_dir)
    try:
        plan, _notes = plan_of(read_adapter_config(directory), ModuleIndex.from_model_dir(model_dir), directory)
        answer: dict = {"modules": plan.to_json()["modules"]}
    except UserError as error:
        answer = {"error": {"message": error.message, "help": error.help, "exit_code": error.exit_code}}
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
