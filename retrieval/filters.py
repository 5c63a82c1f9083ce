"""`where` filters: one SQL predicate over a table's columns, checked and run by DuckDB in a sandbox.

The filter may come from anyone (a server passes it through), so it is held to a predicate and nothing more:
- it is parsed first, wrapped as `SELECT row FROM store WHERE (<where>)`; the parse must be that one SELECT,
  unchanged around the predicate, so a `)` breakout, a second statement or a set operation is refused;
- inside, only expressions are allowed: no subquery (so no table function, no file or catalog read), no
  window, no `*`, no parameter, and none of the functions that build large values out of constants;
- it runs on its own in-memory connection with external access off (no file, extension or network) and
  the configuration locked, and it is interrupted after `FILTER_SECONDS`.
A search runs its filters in a child process with a memory limit (retrieval.filter_worker), since a few
allowed functions can still grow values without bound.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from retrieval.errors import RetrievalError, first_line

FILTER_SECONDS = 10.0
MAX_FILTER_CHARS = 10_000
ALLOWED_CLASSES = {"BETWEEN", "CASE", "CAST", "COLLATE", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "CONSTANT",
                   "FUNCTION", "LAMBDA", "LAMBDA_REF", "OPERATOR", "TYPE"}
# Functions that turn a small constant into a huge value, or that read the engine's own state rather than the
# store's columns; built-in macros that hide a subquery are refused too (`subquery_macros`).
REFUSED_FUNCTIONS = {"range", "generate_series", "repeat", "lpad", "rpad", "list_resize", "array_resize", "bar",
                     "printf", "format", "current_setting", "getvariable", "query", "query_table"}
MAX_DEPTH = 400  # nesting of the parsed expression (JSON levels: about four per function call)
SANDBOX = {"enable_external_access": False, "autoload_known_extensions": False,
           "autoinstall_known_extensions": False, "allow_community_extensions": False,
           "allow_unsigned_extensions": False, "memory_limit": "2GB", "lock_configuration": True}


class SandboxedTable:
    """An Arrow table on its own sandboxed DuckDB connection, kept for one filter after another: connecting
    costs about 30 ms, more than a filter over 100k rows takes. A checked filter can change nothing on it."""

    def __init__(self, table):
        import duckdb

        self.con = duckdb.connect(config=SANDBOX)
        self.con.register("store", table)
        self.spent = False  # a filter was stopped mid-way: start afresh rather than trust this connection

    def rows(self, where: str, column: str = "row") -> np.ndarray:
        """The values of `column` (int64, ascending) of the rows that satisfy `where`."""
        import duckdb

        timer = threading.Timer(FILTER_SECONDS, self.con.interrupt)
        try:
            query = checked_query(self.con, where, column)
            timer.start()
            result = self.con.execute(query).fetchnumpy()
        except duckdb.InterruptException:
            self.spent = True
            raise RetrievalError(f"--where filter took longer than {FILTER_SECONDS:g} s and was stopped") from None
        except duckdb.OutOfMemoryException:
            self.spent = True
            raise RetrievalError("--where filter needed more memory than a filter may use and was stopped") from None
        except duckdb.Error as e:
            raise RetrievalError(f"invalid --where filter: {first_line(e)}") from None
        finally:
            timer.cancel()
        return np.sort(np.asarray(result[column], dtype=np.int64))

    def close(self) -> None:
        self.con.close()


def filter_rows(table, where: str, column: str = "row") -> np.ndarray:
    """The values of `column` (int64, ascending) of the rows of an Arrow `table` that satisfy `where`."""
    sandboxed = SandboxedTable(table)
    try:
        return sandboxed.rows(where, column)
    finally:
        sandboxed.close()


def column_types(table) -> dict[str, str]:
    """Each column of an Arrow `table` with its SQL type as a filter sees it (BIGINT, VARCHAR, DOUBLE[], ...)."""
    import duckdb

    con = duckdb.connect(config=SANDBOX)
    try:
        con.register("store", table.schema.empty_table())
        return {name: kind for name, kind, *_ in con.execute("DESCRIBE store").fetchall()}
    finally:
        con.close()


def checked_query(con, where: str, column: str = "row") -> str:
    """`SELECT column FROM store WHERE (where)`, once `where` is known to be one allowed predicate; the very
    text that was checked is the text to run."""
    if not isinstance(where, str):
        raise RetrievalError(f"invalid --where filter: it must be a string, not {type(where).__name__}")
    if not where.strip():
        raise RetrievalError("invalid --where filter: it is empty")
    if len(where) > MAX_FILTER_CHARS:
        raise RetrievalError(f"invalid --where filter: {len(where)} characters > limit {MAX_FILTER_CHARS}")
    if "\x00" in where:
        raise RetrievalError("invalid --where filter: it holds a NUL character")
    query = f"SELECT {column} FROM store WHERE (\n{where}\n)"  # its own lines: a `--` comment cannot eat the `)`
    try:
        parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0])
    except RecursionError:
        raise RetrievalError("invalid --where filter: it is nested too deeply") from None
    if parsed.get("error"):
        message = parsed.get("error_message", "")
        if "Only SELECT" in message or "multiple" in message.lower():
            raise RetrievalError("invalid --where filter: it must be one predicate, not statements")
        raise RetrievalError(f"invalid --where filter: {message.splitlines()[0] if message else 'cannot parse'}")
    statements = parsed["statements"]
    node = statements[0]["node"] if len(statements) == 1 else {}
    if not _is_plain_select(node, column):
        raise RetrievalError("invalid --where filter: it must be one predicate over the store's columns "
                             "(no ')' breakout, second statement, UNION, ORDER BY or LIMIT)")
    _check_expression(node["where_clause"], REFUSED_FUNCTIONS | subquery_macros(con))
    return query


def _is_plain_select(node: dict[str, Any], column: str) -> bool:
    """Whether the parse is exactly `SELECT <column> FROM store WHERE (...)`."""
    if node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("cte_map", {}).get("map"):
        return False
    select = node.get("select_list", [])
    source = node.get("from_table", {})
    return (len(select) == 1 and select[0].get("class") == "COLUMN_REF" and select[0].get("column_names") == [column]
            and source.get("type") == "BASE_TABLE" and source.get("table_name") == "store"
            and not source.get("schema_name") and not source.get("catalog_name")
            and node.get("where_clause") is not None and not node.get("group_expressions")
            and not node.get("group_sets") and node.get("having") is None and node.get("qualify") is None
            and node.get("sample") is None)


def _check_expression(value: Any, refused: set[str], depth: int = 0) -> None:
    """Walk the parsed expression; every node must be an allowed expression class and function."""
    if depth > MAX_DEPTH:
        raise RetrievalError("invalid --where filter: it is nested too deeply")
    if isinstance(value, list):
        for item in value:
            _check_expression(item, refused, depth + 1)
        return
    if not isinstance(value, dict):
        return
    if "class" in value:
        kind = value["class"]
        if kind == "SUBQUERY":
            raise RetrievalError("invalid --where filter: subqueries are not allowed; filter on the store's columns")
        if kind not in ALLOWED_CLASSES:
            raise RetrievalError(f"invalid --where filter: {kind.lower().replace('_', ' ')} expressions are not "
                                 "allowed")
        name = str(value.get("function_name", "")).lower()
        if kind == "FUNCTION" and name in refused:
            raise RetrievalError(f"invalid --where filter: function {name}() is not allowed in a filter")
    elif str(value.get("type", "")).endswith("_NODE"):  # a query nested anywhere
        raise RetrievalError("invalid --where filter: subqueries are not allowed; filter on the store's columns")
    for item in value.values():
        _check_expression(item, refused, depth + 1)


_SUBQUERY_MACROS: set[str] | None = None


def subquery_macros(con) -> set[str]:
    """Built-in macros whose body is a query (they read the catalog); asked of DuckDB once per process."""
    global _SUBQUERY_MACROS
    if _SUBQUERY_MACROS is None:
        rows = con.execute("SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type = "
                           "'macro' AND regexp_matches(macro_definition, '(?i)\\b(select|from)\\b')").fetchall()
        _SUBQUERY_MACROS = {name for (name,) in rows}
    return _SUBQUERY_MACROS
