"""The database of jobs and images, through SQLAlchemy: SQLite in the data folder by default, any URL by setting.

The schema is owned by Alembic (models/jobs/migrations, shipped inside the package so installed copies have it);
`Store` upgrades the database to the latest revision when it opens it, so a new release's tables appear on
start-up. Every method opens its own short session and returns detached rows, so it can be called from any
thread (the recorder thread writes, request handlers read through a thread pool).
"""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker
from sqlalchemy.pool import StaticPool

from models.types import UNFINISHED_STATUSES, JobStatus

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x5D5E7E  # any constant: the advisory lock that serialises migrations on PostgreSQL
UNFINISHED = tuple(status.value for status in UNFINISHED_STATUSES)


class StoreUnavailable(RuntimeError):
    """The database cannot be opened or migrated: the server does not start without it."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: stored naive, read back as UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class JobRecord(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200), index=True)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    loras: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, doc="The LoRAs as they ran")
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, doc="Every request parameter, as queued")
    prompt_used: Mapped[str | None] = mapped_column(Text, doc="The prompt the pipeline got (trigger words added)")
    controlnet: Mapped[dict[str, Any] | None] = mapped_column(JSON, doc="The ControlNet it ran with")
    family: Mapped[str | None] = mapped_column(String(16), doc="The model's family: sd, sdxl, sd3, flux, ...")
    family_arguments: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, doc="The family's own arguments it ran with (prompt_2, original_size, refiner, guidance, ...)"
    )
    seed_origin: Mapped[str | None] = mapped_column(String(8), doc="client: the request chose the seed; drawn")
    seed: Mapped[int | None] = mapped_column(BigInteger)
    seeds: Mapped[list[int] | None] = mapped_column(JSON)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    scheduler: Mapped[str | None] = mapped_column(String(100))
    guidance_scale: Mapped[float | None] = mapped_column(Float)
    strength: Mapped[float | None] = mapped_column(Float)
    output_format: Mapped[str] = mapped_column(String(8), default="png")
    save_images: Mapped[bool] = mapped_column(Boolean, default=False)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    source: Mapped[str | None] = mapped_column(String(50), doc="The route that submitted it")
    engine: Mapped[str | None] = mapped_column(
        String(100), index=True, doc="The engine replica that took it (Ray Serve); None in one process"
    )
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    images: Mapped[list[ImageRecord]] = relationship(
        back_populates="job", order_by="ImageRecord.index", cascade="all, delete-orphan"
    )


class ImageRecord(Base):
    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str] = mapped_column(String(1000), doc="Relative to the output folder")
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    parameters_text: Mapped[str] = mapped_column(Text, doc="The AUTOMATIC1111 `parameters` text in the PNG")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)

    job: Mapped[JobRecord] = relationship(back_populates="images")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_timestamp(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    in_memory = sqlite and parsed.database in (None, "", ":memory:")
    if sqlite and not in_memory:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    if in_memory:
        # One shared connection, or every thread (recorder, request handlers) would see its own empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets request handlers read while the recorder writes; foreign keys are off by default in SQLite.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to `revision` with Alembic, on this engine's connection. Processes that open one
    database at once (engine replicas) take turns: a file lock beside a SQLite file, an advisory lock on PostgreSQL."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    url = engine.url
    sqlite_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    file_lock = FileLock(f"{url.database}.migrate.lock") if sqlite_file else contextlib.nullcontext()
    with file_lock, engine.begin() as connection:
        if url.get_backend_name() == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


class Store:
    def __init__(self, url: str, migrate: bool = True):
        shown = make_url(url).render_as_string(hide_password=True)
        try:
            self.engine = make_engine(url)
            if migrate:
                upgrade(self.engine)
        except (SQLAlchemyError, OSError) as error:
            raise StoreUnavailable(f"cannot open the jobs database {shown} (SDSERVE_DATABASE_URL): {error}") from error
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        logger.info("job database at %s", shown)

    def close(self) -> None:
        self.engine.dispose()

    # -- writes (the recorder thread) -------------------------------------------------------------------------
    def save_job(self, values: dict[str, Any]) -> None:
        """Insert the job, or update the columns given (the recorder sends each job's changes in order)."""
        with self._sessions.begin() as session:
            record = session.get(JobRecord, values["id"])
            if record is None:
                session.add(JobRecord(**values))
            else:
                for name, value in values.items():
                    setattr(record, name, value)

    def add_images(self, images: list[ImageRecord]) -> None:
        with self._sessions.begin() as session:
            session.add_all(images)

    def mark_interrupted(self, reason: str, engine: str | None = None) -> int:
        """Jobs left queued or running by a server that stopped without finishing them: every such job, or with
        `engine` only those that engine replica took (its siblings' jobs on a shared database are still running)."""
        query = update(JobRecord).where(JobRecord.status.in_(UNFINISHED))
        if engine is not None:
            query = query.where(JobRecord.engine == engine)
        with self._sessions.begin() as session:
            result = session.execute(
                query.values(status=JobStatus.interrupted.value, error=reason, finished_at=utcnow())
            )
            return result.rowcount or 0

    def fail_unfinished(self, job_id: str, reason: str) -> bool:
        """Mark one job failed unless it has already finished (its engine replica died while running it)."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.status.in_(UNFINISHED))
                .values(status=JobStatus.failed.value, error=reason, finished_at=utcnow())
            )
            return bool(result.rowcount)

    # -- reads ------------------------------------------------------------------------------------------------
    def get_job(self, job_id: str) -> JobRecord | None:
        with self._sessions() as session:
            return session.get(JobRecord, job_id, options=[selectinload(JobRecord.images)])

    def list_jobs(self, limit: int, offset: int, status: str | None = None) -> tuple[list[JobRecord], int]:
        query = select(JobRecord)
        if status:
            query = query.where(JobRecord.status == status)
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(
                query.options(selectinload(JobRecord.images))
                .order_by(JobRecord.created_at.desc(), JobRecord.id)
                .limit(limit)
                .offset(offset)
            ).all()
            return list(rows), total

    def get_image(self, image_id: str) -> ImageRecord | None:
        with self._sessions() as session:
            return session.get(ImageRecord, image_id)

    def list_images(
        self, limit: int, offset: int, model: str | None = None, prompt: str | None = None
    ) -> tuple[list[ImageRecord], int]:
        query = select(ImageRecord)
        if model:
            query = query.where(ImageRecord.model == model)
        if prompt:
            query = query.where(ImageRecord.prompt.icontains(prompt, autoescape=True))
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(
                query.order_by(ImageRecord.created_at.desc(), ImageRecord.job_id, ImageRecord.index)
                .limit(limit)
                .offset(offset)
            ).all()
            return list(rows), total
