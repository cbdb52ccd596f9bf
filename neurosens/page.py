"""HTML pages: the study of several models, and the report of one training run; one self-contained
file each, tables escaped and images inlined."""
import base64
import html


def head_html(title):
    """The page's start, up to and including its title heading."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
            "figcaption{color:#666;font-size:90%}.note{color:#555}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>")


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
        head_html(title),
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


def write_run_html(path, title, config, history, records, figure=None):
    """One training run as a self-contained HTML page: its options, its per-epoch metrics and,
    when there are monitor ``records``, their table and ``figure``."""
    options = config["config"]
    option_rows = [[name, value] for name, value in options.items()] + [[f"meta.{k}", v] for k, v in config.get("meta", {}).items()]
    columns = [c for c in dict.fromkeys(k for h in history for k in h) if c != "monitor"]

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else value

    parts = [
        head_html(title),
        "<h2>Epochs</h2>",
        table_html(columns, [[cell(h.get(c, "")) for c in columns] for h in history]),
    ]
    if records:
        layers = list(dict.fromkeys(layer for r in records for layer in r["sensitivity"]))
        parts += ["<h2>Sensitivity while training</h2>",
                  f"<p>Mean neuron sensitivity of each layer and the accuracy on a fixed probe of {records[-1]['samples']} "
                  "test images, its adversarial twins crafted anew against the model at each measurement.</p>"]
        if figure is not None:
            parts.append(image_html(figure, "per-layer sensitivity and probe accuracy over training"))
        parts.append(table_html(["step", "epoch", "clean", "robust"] + layers,
                                [[r["step"], r["epoch"], f"{100 * r['clean']:.1f}%", f"{100 * r['robust']:.1f}%"]
                                 + [cell(r["sensitivity"].get(layer, "")) for layer in layers] for r in records]))
    parts += ["<h2>Options</h2>", table_html(["option", "value"], option_rows), "</body></html>"]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
