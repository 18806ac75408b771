"""`drpo inspect` over rollout dumps (the format: `drpo.dumps`): `analysis`, what each
registered method would do to the dumped tokens; `report`, Markdown, HTML, JSON and figures;
`cli`. See docs/inspect.md."""
