"""Spreadsheet tables (CMMD's clinical data ships as .xlsx, INbreast's as .xls) as row dicts."""

from __future__ import annotations

import csv
from pathlib import Path


def read_spreadsheet(path: Path) -> list[dict[str, str]]:
    """First sheet of ``.xlsx`` (openpyxl) / ``.xls`` (xlrd), or a ``.csv``, as string dicts."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        first = text.splitlines()[0] if text else ""
        delim = ";" if first.count(";") > first.count(",") else ","
        return [{(k or "").strip(): (v or "").strip() for k, v in r.items()}
                for r in csv.DictReader(text.splitlines(), delimiter=delim)]
    if suffix == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise ValueError(f"{path.name}: reading .xlsx needs openpyxl "
                             "(pip install 'mammo-node[research]'), or export it as CSV") from None
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        rows = [["" if v is None else str(v) for v in r]
                for r in wb.worksheets[0].iter_rows(values_only=True)]
        wb.close()
    elif suffix == ".xls":
        try:
            import xlrd
        except ImportError:
            raise ValueError(f"{path.name}: reading .xls needs xlrd, or export it as CSV") \
                from None
        sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
        rows = [[_cell(v) for v in sheet.row_values(i)] for i in range(sheet.nrows)]
    else:
        raise ValueError(f"{path.name}: not a .csv, .xls or .xlsx table")
    rows = [r for r in rows if any(str(v).strip() for v in r)]
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    return [{h: str(v).strip() for h, v in zip(header, r, strict=False) if h} for r in rows[1:]]


def _cell(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
