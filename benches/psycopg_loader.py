"""The loader a user would write by hand, for comparison with the pipeline:
csv + a dict of seen ids + psycopg COPY per 20,000 rows, one connection.

    python3 benches/psycopg_loader.py INPUT_DIR postgres://.../DB

It creates `ecommerce_events` as the host does, applies the shipped
transform's rules that the generator's data exercises (type spellings,
positive ids, non-negative prices; malformed rows are skipped), and prints
events/s and CPU seconds per million events. Needs `pip install
psycopg[binary]`.
"""
import csv, datetime, os, sys, time, uuid
import psycopg

ALLOWED = {"view", "add_to_cart", "remove_from_cart", "purchase"}
SPELLINGS = {"addtocart": "add_to_cart"}


def rows(folder, seen):
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), newline="") as f:
            for r in csv.DictReader(f):
                try:
                    kind = r["event_type"].strip().lower().replace("-", "_").replace(" ", "_")
                    kind = SPELLINGS.get(kind, kind)
                    event = (str(uuid.UUID(r["event_id"])), int(r["user_id"]), kind,
                             int(r["product_id"]), round(float(r["price"]), 2),
                             datetime.datetime.fromisoformat(r["event_time"].replace("Z", "+00:00")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
                if kind in ALLOWED and event[1] > 0 and event[3] > 0 and event[4] >= 0 and event[0] not in seen:
                    seen.add(event[0])
                    yield event


def main(folder, url):
    start, cpu = time.monotonic(), time.process_time()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS ecommerce_events (event_id UUID PRIMARY KEY, "
                     "user_id INT NOT NULL, event_type VARCHAR(20) NOT NULL, product_id INT NOT NULL, "
                     "price NUMERIC(10,2) NOT NULL, event_time TIMESTAMP NOT NULL)")
        batch, n = [], 0
        for event in rows(folder, set()):
            batch.append(event)
            if len(batch) == 20_000:
                n += copy(conn, batch)
        n += copy(conn, batch)
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    print(f"{n} rows in {wall:.2f} s: {n / wall:,.0f} events/s, {cpu / n * 1e6:.2f} CPU-s per 1M (loader only)")


def copy(conn, batch):
    with conn.transaction(), conn.cursor().copy("COPY ecommerce_events FROM STDIN") as cp:
        for event in batch:
            cp.write_row(event)
    n = len(batch)
    batch.clear()
    return n


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
