"""The study's HTML page: one self-contained file, tables escaped and images inlined."""
import base64
import html


def table_html(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_html(path, alt):
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def write_html(path, title, summary, robust, comparison, plots, curve_plot, notes):
    """The study as one self-contained HTML page."""
    labels = list(robust)
    columns = [c for c in next(iter(robust.values())) if c != "n"]
    robust_rows = [[label] + [f"{100 * robust[label][c]:.1f}%" for c in columns] for label in labels]
    comp_header, comp_cells = comparison.text_rows()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
        "figcaption{color:#666;font-size:90%}.note{color:#555}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(summary)}</p>",
        "<h2>Robustness</h2>",
        table_html(["model"] + columns, robust_rows),
        "<h2>Neuron sensitivity</h2>",
        table_html(comp_header, comp_cells),
    ]
    parts += [image_html(p, alt) for alt, p in plots]
    parts += ["<h2>Interventions</h2>", image_html(curve_plot, "intervention curves")]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
