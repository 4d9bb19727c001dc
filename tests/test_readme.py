"""The README's registry table is the registries' own listing, so a new component cannot go undocumented."""

import os
import re

from diffusion.registry import CONFIG_SECTIONS, registry_table
from tests.conftest import REPO_ROOT


def _readme_table() -> str:
    with open(os.path.join(REPO_ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    match = re.search(r'<!-- registry-table:start -->\n(.*?)\n<!-- registry-table:end -->', text, re.S)
    assert match, 'README.md lost its registry-table markers'
    return match.group(1)


def test_readme_lists_every_registry_name():
    assert _readme_table() == registry_table(), 'README.md is stale: paste `python -m diffusion.registry` into it'


def test_the_table_names_every_builtin_entry_of_every_section():
    table = registry_table()
    for section, reg in CONFIG_SECTIONS.items():
        row = next(line for line in table.splitlines() if line.startswith(f'| `{section}` |'))
        assert all(f'`{name}`' in row for name in reg.names()), section
    assert '`compile_denoiser`' in table and '`attention_backend`' in table and '`gradient_checkpointing`' in table
