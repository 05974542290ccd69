-- The events table, as the pipeline writes it. The host also creates it
-- (and its own bookkeeping schema `pipeline`) when absent.
CREATE TABLE IF NOT EXISTS ecommerce_events (
    event_id VARCHAR(36) PRIMARY KEY,
    user_id INT NOT NULL,
    event_type VARCHAR(20) NOT NULL,
    product_id INT NOT NULL,
    price NUMERIC(10,2) NOT NULL,
    event_time TIMESTAMP NOT NULL
);
