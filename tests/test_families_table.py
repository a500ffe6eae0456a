"""docs/families.md's table is generated from the registry and must be up to date (issue 13 item 4)."""

from core import families_table
from core.families import REFUSED


def test_docs_families_table_is_up_to_date():
    assert families_table.main(["--check"]) == 0, "run python -m core.families_table"


def test_the_table_names_every_refusal_and_the_coverage():
    table = families_table.render()
    for model_type in REFUSED:
        assert f"| `{model_type}` | - | refused: " in table
    supported, refused, found = families_table.coverage(families_table.family_rows())
    assert f"{supported} of {found} MoE causal-LM families" in table and refused == len(REFUSED)


def test_an_edited_table_is_out_of_date():
    text = families_table.DOC.read_text(encoding="utf-8")
    stale = text.replace("| `mixtral` |", "| `mixtral-edited` |")
    assert stale != text and families_table.updated(stale, families_table.render()) == text
