"""Baseline: the schema of the release before migrations (main with issues 13-17).

Applied to an empty database it creates that schema. Applied to a database an earlier node
made without migrations (``create_all`` plus the old additive ``upgrade_schema``), it adds what
is missing, as that function did: missing tables, missing columns (nullable, with their scalar
default), missing indexes; duplicate live jobs of a version that queued one per instance are
merged before the unique "one live job per study" index is made. Nothing is dropped.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = sa.MetaData()

sa.Table(
    'installed_models', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('architecture', sa.String(length=64), nullable=False),
    sa.Column('input_size', sa.Integer(), nullable=False),
    sa.Column('roi_size_mm', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('weights_sha256', sa.String(length=64), nullable=False),
    sa.Column('card_sha256', sa.String(length=64), nullable=False),
    sa.Column('relpath', sa.String(length=255), nullable=False),
    sa.Column('card_file', sa.String(length=255), nullable=False, server_default='card.json'),
    sa.Column('weights_file', sa.String(length=255), nullable=False),
    sa.Column('detector_file', sa.String(length=255), nullable=False, server_default=''),
    sa.Column('detector_sha256', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('intended_use', sa.Text(), nullable=False, server_default=''),
    sa.Column('data_licence', sa.Text(), nullable=False, server_default=''),
    sa.Column('metrics', sa.Text(), nullable=False, server_default='{}'),
    sa.Column('installed_at', sa.DateTime(), nullable=False),
    sa.UniqueConstraint('name', 'version'),
)
sa.Table(
    'model_events', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False, index=True),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('version', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('detail', sa.Text(), nullable=False, server_default=''),
)
sa.Table(
    'model_roles', metadata,
    sa.Column('role', sa.String(length=16), primary_key=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('changed_at', sa.DateTime(), nullable=False),
)
sa.Table(
    'other_objects', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, index=True),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False, unique=True),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('relpath', sa.String(length=255), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('calling_aet', sa.String(length=16), nullable=False, server_default=''),
    sa.Column('received_at', sa.DateTime(), nullable=False, index=True),
)
sa.Table(
    'outcomes', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, index=True),
    sa.Column('laterality', sa.String(length=2), nullable=False),
    sa.Column('finding_index', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('truth', sa.String(length=16), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('outcome_date', sa.String(length=10), nullable=False, server_default=''),
    sa.Column('source', sa.String(length=255), nullable=False, server_default=''),
    sa.Column('imported_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.UniqueConstraint('study_uid', 'laterality', 'finding_index', 'kind', 'outcome_date'),
)
sa.Table(
    'scored_breasts', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, index=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True, index=True),
    sa.Column('laterality', sa.String(length=2), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False, index=True),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('findings', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('analysed_at', sa.DateTime(), nullable=False, index=True),
    sa.UniqueConstraint('study_uid', 'laterality', 'model_name', 'model_version'),
)
sa.Table(
    'scored_findings', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, index=True),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('finding_index', sa.Integer(), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('laterality', sa.String(length=2), nullable=False),
    sa.Column('view', sa.String(length=16), nullable=False, server_default=''),
    sa.Column('centre_x', sa.Float(), nullable=False),
    sa.Column('centre_y', sa.Float(), nullable=False),
    sa.Column('radius_mm', sa.Float(), nullable=False),
    sa.Column('pixel_spacing_mm', sa.Float(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
)
sa.Table(
    'shadow_runs', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, index=True),
    sa.Column('job_id', sa.Integer(), nullable=False, index=True),
    sa.Column('input_key', sa.String(length=64), nullable=False),
    sa.Column('inputs', sa.Text(), nullable=False, server_default='[]'),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('active_name', sa.String(length=64), nullable=False),
    sa.Column('active_version', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, index=True, server_default='queued'),
    sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True, index=True),
    sa.Column('roi_count', sa.Integer(), nullable=True),
    sa.Column('max_probability', sa.Float(), nullable=True),
    sa.Column('analysis_ms', sa.Float(), nullable=True),
    sa.Column('relpath', sa.String(length=255), nullable=True),
    sa.UniqueConstraint('job_id', 'input_key', 'model_name', 'model_version'),
)
sa.Table(
    'studies', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False, unique=True, index=True),
    sa.Column('state', sa.String(length=16), nullable=False, index=True,
              server_default='receiving'),
    sa.Column('generation', sa.Integer(), nullable=False, server_default='1'),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('last_received_at', sa.DateTime(), nullable=False, index=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True, index=True),
)
sa.Table(
    'jobs', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_id', sa.Integer(), sa.ForeignKey('studies.id'), nullable=False, index=True),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('input_key', sa.String(length=64), nullable=False, index=True),
    sa.Column('state', sa.String(length=16), nullable=False, index=True, server_default='queued'),
    sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Index('ix_jobs_one_live_per_study', 'study_id', unique=True,
             sqlite_where=sa.text("state IN ('queued', 'running')"),
             postgresql_where=sa.text("state IN ('queued', 'running')")),
)
sa.Table(
    'series', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_id', sa.Integer(), sa.ForeignKey('studies.id'), nullable=False, index=True),
    sa.Column('series_uid', sa.String(length=64), nullable=False, unique=True),
    sa.Column('modality', sa.String(length=16), nullable=False, server_default=''),
)
sa.Table(
    'instances', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_id', sa.Integer(), sa.ForeignKey('studies.id'), nullable=False, index=True),
    sa.Column('series_id', sa.Integer(), sa.ForeignKey('series.id'), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False, unique=True),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
    sa.Column('relpath', sa.String(length=255), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('laterality', sa.String(length=2), nullable=False, server_default=''),
    sa.Column('view', sa.String(length=16), nullable=False, server_default=''),
    sa.Column('for_processing', sa.Boolean(), nullable=False, server_default='0'),
    sa.Column('calling_aet', sa.String(length=16), nullable=False, server_default=''),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=True, index=True),
    sa.Column('outcome_reason', sa.Text(), nullable=True),
)
sa.Table(
    'results', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('study_id', sa.Integer(), sa.ForeignKey('studies.id'), nullable=False, index=True),
    sa.Column('job_id', sa.Integer(), sa.ForeignKey('jobs.id'), nullable=False),
    sa.Column('analysis_key', sa.String(length=64), nullable=False, unique=True),
    sa.Column('current', sa.Boolean(), nullable=False, server_default='1'),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('roi_count', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('max_probability', sa.Float(), nullable=True),
    sa.Column('analysis_ms', sa.Float(), nullable=False, server_default='0.0'),
    sa.Column('summary', sa.Text(), nullable=False, server_default='{}'),
)
sa.Table(
    'deliveries', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('result_id', sa.Integer(), sa.ForeignKey('results.id'), nullable=False, index=True),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, index=True, server_default='pending'),
    sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('last_status', sa.String(length=16), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.UniqueConstraint('result_id', 'destination'),
)
sa.Table(
    'result_kinds', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('result_id', sa.Integer(), sa.ForeignKey('results.id'), nullable=False, index=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, index=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False, server_default='1'),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.UniqueConstraint('result_id', 'kind'),
)
sa.Table(
    'result_objects', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('result_id', sa.Integer(), sa.ForeignKey('results.id'), nullable=False, index=True),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_uid', sa.String(length=64), nullable=False),
    sa.Column('relpath', sa.String(length=255), nullable=False),
)
sa.Table(
    'delivery_kinds', metadata,
    sa.Column('id', sa.Integer(), primary_key=True, nullable=False),
    sa.Column('delivery_id', sa.Integer(), sa.ForeignKey('deliveries.id'), nullable=False,
              index=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False, server_default='pending'),
    sa.Column('last_status', sa.String(length=16), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(), nullable=True),
    sa.UniqueConstraint('delivery_id', 'kind'),
)



def upgrade() -> None:
    bind = op.get_bind()
    insp = sa.inspect(bind)
    present = set(insp.get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in present:
            table.create(bind)
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            # a copy of the model's default clause (the model's own stays bound to its column)
            server_default = column.server_default
            default = (sa.DefaultClause(server_default.arg)
                       if isinstance(server_default, sa.DefaultClause) else None)
            op.add_column(table.name, sa.Column(column.name, column.type, nullable=True,
                                                server_default=default))
    jobs_indexes = {ix["name"] for ix in sa.inspect(bind).get_indexes("jobs")}
    if "ix_jobs_one_live_per_study" not in jobs_indexes:
        _merge_duplicate_live_jobs(bind)
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(bind, checkfirst=True)


def _merge_duplicate_live_jobs(bind: sa.Connection) -> None:
    """Of each study's live jobs the newest stays, the others become ``superseded``."""
    jobs = metadata.tables["jobs"]
    live = bind.execute(sa.select(jobs.c.id, jobs.c.study_id)
                        .where(jobs.c.state.in_(("queued", "running")))
                        .order_by(jobs.c.study_id, jobs.c.id.desc())).all()
    keep: set[int] = set()
    drop: list[int] = []
    for job_id, study_id in live:
        if study_id in keep:
            drop.append(job_id)
        else:
            keep.add(study_id)
    if drop:
        bind.execute(jobs.update().where(jobs.c.id.in_(drop)).values(
            state="superseded", error="merged into the study's newest job (schema upgrade)"))


def downgrade() -> None:
    raise NotImplementedError("the baseline is not downgraded: restore the backup instead")
