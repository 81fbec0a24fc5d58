"""idempotency keys, forgotten conversation ids, export registry

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000

Retried writes carry an idempotency key so a retry after a lost commit acknowledgement finds the row it
already wrote; a /forget tombstone keeps the ids it deleted so files written earlier can be cleaned later;
exports written by the project are registered so /forget can reach them.
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import storage.models

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYED = ('conversation', 'turn', 'feedback', 'datadeletion')


def upgrade() -> None:
    for table in _KEYED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
            batch_op.create_index(f'ix_{table}_idempotency_key', ['idempotency_key'], unique=True)
    with op.batch_alter_table('datadeletion', schema=None) as batch_op:
        batch_op.add_column(sa.Column('conversation_ids', sa.JSON(), nullable=False, server_default='[]'))
    op.create_table('exportfile',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('created_at', storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('path', name='uq_exportfile_path')
    )


def downgrade() -> None:
    op.drop_table('exportfile')
    with op.batch_alter_table('datadeletion', schema=None) as batch_op:
        batch_op.drop_column('conversation_ids')
    for table in reversed(_KEYED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_idempotency_key')
            batch_op.drop_column('idempotency_key')
