"""Redis keyspace migrations, ``NNNN_name.py`` each with an idempotent ``up(redis)``: installed as the
package ``app.migrations`` and applied in order by ``x402-proxy migrate`` (app/payments/migrate.py)."""
