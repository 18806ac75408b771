"""Rollout dumps (`drpo.inspect.dump`: Parquet writer and streaming reader) and `drpo inspect`
(`analysis`: what each registered method would do to the dumped tokens; `report`: Markdown,
HTML, JSON and figures; `cli`). See docs/inspect.md."""
