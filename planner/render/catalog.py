"""Rich rendering of the catalogs: `ftplan models` and `ftplan instances`.

Entries may come from plugins, so every name and note is shown as data (render.console's plain), never markup."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ftplan.data import catalog
from ftplan.render.console import clean, is_narrow, line, lines, plain, table


def _names(m: catalog.CatalogModel, narrow: bool) -> Text:
    """The entry's name and its variants' names, one a line; narrow: with the type, and the Hub ids under them."""
    out = Text()
    for name, hf_id in ((m.name, m.hf_id), *((v.name, v.hf_id) for v in m.variants)):
        out.append(("\n" if out else "") + clean(name) + (f" ({clean(m.config['model_type'])})" if narrow else ""))
        if narrow:
            out.append("\n  " + clean(hf_id), style="dim")
    return out


def models_table(rows: list[catalog.CatalogModel], width: int = 120) -> Table:
    """The catalogued models, instruct/chat variants under their base; on a narrow terminal the type and Hub
    id go with the name and the hidden size is left out."""
    narrow = is_narrow(width)
    out = table("catalogued models", ("name (type) / HF id" if narrow else "name", "left", True),
                *(() if narrow else (("HF id", "left", True), "type")), ("layers", "right", True),
                *(() if narrow else (("hidden", "right", True),)), ("vocab", "right", True), "licence", width=width)
    for m in rows:
        c = m.config
        hidden = str(c.get("hidden_size") or c.get("n_embd") or c.get("n_embed"))
        ids = lines(m.hf_id, *(v.hf_id for v in m.variants))
        out.add_row(_names(m, narrow), *(() if narrow else (ids, plain(c["model_type"]))),
                    str(c.get("num_hidden_layers") or c.get("n_layer")), *(() if narrow else (hidden,)),
                    f"{c['vocab_size']:,}", plain(m.license))
    return out


def instances_list(rows: list[catalog.Instance], region: str | None = None, width: int = 120) -> Table:
    """Instance types with their GPUs and prices. When every price shown has the same date, the title
    carries it instead of a column, which leaves an 80-column terminal room for the instance names."""
    prices = [i.priced(region) for i in rows]
    dates = {p.date for p in prices if p}
    dated = len(dates) > 1
    when = f", prices of {clean(next(iter(dates)))}" if len(dates) == 1 else ""
    out = table(f"catalogued instances (on-demand, {clean(region or 'each in its own region')}{when})",
                ("instance", "left", True), "GPUs", ("GiB/GPU", "right", True), ("vCPU", "right", True),
                ("RAM GiB", "right"), "link" if is_narrow(width) else "interconnect", ("$/hour", "right", True),
                *((("price date", "left", True),) if dated else ()), width=width)
    for i, price in zip(rows, prices):
        gpu = catalog.gpu_of(i)
        out.add_row(plain(i.type), plain(f"{i.gpu_count} x {gpu.name}"), f"{gpu.memory_gib_reported:g}",
                    str(i.vcpus), f"{i.memory_gib:g}", plain(i.interconnect),
                    f"{price.usd_per_hour:,.4g}" if price else "n/a", *((plain(price.date if price else ""),)
                                                                        if dated else ()))
    return out


def unpriced_lines(rows: list[catalog.Instance], region: str | None = None) -> list[Text]:
    """Why an instance shown has no price (its catalog note)."""
    return [line(f"{i.type}: no price" + (f" in {region}" if region else "") + (f" ({i.notes})" if i.notes else ""),
                 style="dim") for i in rows if i.priced(region) is None]
