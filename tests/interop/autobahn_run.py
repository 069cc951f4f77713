"""Runs Autobahn TestSuite cases against a WebSocket server with kosoku's fuzzing client.

Usage: autobahn_run.py URL CONCURRENCY REPORT_DIR CASE [CASE ...]

CASE is a case id or a `*` glob (kosoku's selection); REPORT_DIR gets kosoku's Autobahn-format
reports (JSON and HTML per case, index.html), or nothing when it is "-".

Prints one line per case, in case order:

    case ID BEHAVIOR CLOSE REMOTE_CODE LOCAL_CODE [REASON]

BEHAVIOR and CLOSE are Autobahn's labels with spaces as underscores ("WRONG_CODE"); the codes
are the close codes the server and kosoku sent ("-" for none). REASON, kosoku's explanation,
only for ERROR: kosoku gives ERROR both when it cannot run a case (a bug of its own) and when
the connection fails, and only the reason tells those apart. Then one line:

    summary CASES SECONDS
"""

import asyncio
import os
import sys
import time

import kosoku


def label(verdict):
    return verdict.value.replace(" ", "_")


def code(c):
    return "-" if c is None else str(c)


async def main():
    url, concurrency, report_dir, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    start = time.monotonic()
    try:
        results = await kosoku.run_fuzzingclient(url, cases, None, concurrency=concurrency)
    except kosoku.FailureError as failure:
        # Cases that do not pass are outcomes like any other here: the caller compares them.
        results = failure.results
    seconds = time.monotonic() - start
    if report_dir != "-":
        # kosoku's CLI writes its reports with this; it is not re-exported from the package.
        from kosoku._report import write_reports

        write_reports(results, report_dir)
    for r in results:
        line = f"case {r.case_id} {label(r.behavior)} {label(r.behavior_close)}"
        line += f" {code(r.remote_close_code)} {code(r.local_close_code)}"
        if r.behavior.value == "ERROR":
            line += " " + " ".join(r.result.split())
        print(line)
    print(f"summary {len(results)} {seconds:.1f}", flush=True)


asyncio.run(main())
# kosoku 0.1.0's native runtime sometimes aborts the interpreter's shutdown (SIGABRT after every
# line was out: 3 of 43 runs here), so leave without one.
os._exit(0)
