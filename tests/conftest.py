"""Shared pytest options: `--update-golden` rewrites tests/golden/*.txt from the current output."""


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite the expected outputs under tests/golden/ (or set ADAPTERSPEC_UPDATE_GOLDEN=1)",
    )
