-- The demo company database: companies, their filings and metrics.
-- Deterministic, so a recovery can be checked row for row.
CREATE TABLE IF NOT EXISTS companies (
    id         bigint PRIMARY KEY,
    name       text NOT NULL,
    ticker     text NOT NULL UNIQUE,
    sector     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS filings (
    id          bigint PRIMARY KEY,
    company_id  bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    form_type   text NOT NULL,
    filed_on    date NOT NULL,
    body        text NOT NULL
);
CREATE INDEX IF NOT EXISTS filings_company_idx ON filings(company_id);
CREATE TABLE IF NOT EXISTS metrics (
    id          bigint PRIMARY KEY,
    company_id  bigint NOT NULL REFERENCES companies(id) ON DELETE CASCADE,
    metric      text NOT NULL,
    period      date NOT NULL,
    value       numeric(18, 2) NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_company_idx ON metrics(company_id);
-- One row per POST /api/v1/write-check: proves the application can write, and where.
CREATE TABLE IF NOT EXISTS app_write_checks (
    id         bigserial PRIMARY KEY,
    server     text NOT NULL DEFAULT inet_server_port()::text,
    written_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO companies (id, name, ticker, sector)
SELECT i,
       (ARRAY['Acme','Globex','Initech','Umbrella','Stark','Wayne','Wonka','Cyberdyne','Soylent','Tyrell'])[1 + i % 10]
         || ' ' || (ARRAY['Holdings','Industries','Systems','Labs','Group'])[1 + (i / 10) % 5] || ' ' || i,
       'T' || lpad(i::text, 5, '0'),
       (ARRAY['Technology','Energy','Healthcare','Financials','Industrials','Utilities'])[1 + i % 6]
FROM generate_series(1, :companies) AS i
ON CONFLICT DO NOTHING;

INSERT INTO filings (id, company_id, form_type, filed_on, body)
SELECT i, 1 + i % :companies, (ARRAY['10-K','10-Q','8-K','S-1'])[1 + i % 4],
       date '2020-01-01' + (i % 1800), repeat(md5(i::text), 4)
FROM generate_series(1, :companies * 10) AS i
ON CONFLICT DO NOTHING;

INSERT INTO metrics (id, company_id, metric, period, value)
SELECT i, 1 + i % :companies, (ARRAY['revenue','ebitda','net_income','headcount'])[1 + i % 4],
       date '2020-01-01' + (i % 20) * 91, round((random() * 1e6)::numeric, 2)
FROM generate_series(1, :companies * 40) AS i
ON CONFLICT DO NOTHING;
