-- A database made by the release before migrations (main with issues 13-17:
-- node/db.py create_schema), with a study being analysed (job running, no lease) and a
-- delivery being sent. tests/test_migrations.py upgrades it.
BEGIN TRANSACTION;
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_status VARCHAR(16), 
	last_error TEXT, 
	sent_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (result_id, destination), 
	FOREIGN KEY(result_id) REFERENCES results (id)
);
INSERT INTO "deliveries" VALUES(1,1,'pacs','sending',1,'2026-11-30 10:00:00.000000',NULL,NULL,NULL);
CREATE TABLE delivery_kinds (
	id INTEGER NOT NULL, 
	delivery_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	last_status VARCHAR(16), 
	last_error TEXT, 
	sent_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (delivery_id, kind), 
	FOREIGN KEY(delivery_id) REFERENCES deliveries (id)
);
INSERT INTO "delivery_kinds" VALUES(1,1,'tid1500','pending',NULL,NULL,NULL);
CREATE TABLE installed_models (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	version VARCHAR(64) NOT NULL, 
	architecture VARCHAR(64) NOT NULL, 
	input_size INTEGER NOT NULL, 
	roi_size_mm FLOAT NOT NULL, 
	threshold FLOAT NOT NULL, 
	weights_sha256 VARCHAR(64) NOT NULL, 
	card_sha256 VARCHAR(64) NOT NULL, 
	relpath VARCHAR(255) NOT NULL, 
	card_file VARCHAR(255) NOT NULL, 
	weights_file VARCHAR(255) NOT NULL, 
	detector_file VARCHAR(255) NOT NULL, 
	detector_sha256 VARCHAR(64) NOT NULL, 
	intended_use TEXT NOT NULL, 
	data_licence TEXT NOT NULL, 
	metrics TEXT NOT NULL, 
	installed_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name, version)
);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_id INTEGER NOT NULL, 
	sop_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	relpath VARCHAR(255) NOT NULL, 
	size INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	laterality VARCHAR(2) NOT NULL, 
	"view" VARCHAR(16) NOT NULL, 
	for_processing BOOLEAN NOT NULL, 
	calling_aet VARCHAR(16) NOT NULL, 
	received_at DATETIME NOT NULL, 
	outcome VARCHAR(16), 
	outcome_reason TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	FOREIGN KEY(series_id) REFERENCES series (id), 
	UNIQUE (sop_uid)
);
INSERT INTO "instances" VALUES(1,1,1,'1.2.826.0.1.3680043.10.1919.1.1.1','1.2.840.10008.5.1.4.1.1.1.2','1.2.840.10008.1.2.1','instances/x.dcm',10,'0000000000000000000000000000000000000000000000000000000000000000','L','CC',0,'','2026-11-30 10:00:00.000000',NULL,NULL);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	generation INTEGER NOT NULL, 
	input_key VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	error TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "jobs" VALUES(1,1,1,'k1','running',1,'2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000',NULL,NULL);
INSERT INTO "jobs" VALUES(2,2,1,'k2','done',1,'2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000',NULL);
CREATE TABLE model_events (
	id INTEGER NOT NULL, 
	at DATETIME NOT NULL, 
	action VARCHAR(16) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	version VARCHAR(64) NOT NULL, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE model_roles (
	role VARCHAR(16) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	version VARCHAR(64) NOT NULL, 
	changed_at DATETIME NOT NULL, 
	PRIMARY KEY (role)
);
CREATE TABLE other_objects (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	sop_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	relpath VARCHAR(255) NOT NULL, 
	size INTEGER NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	calling_aet VARCHAR(16) NOT NULL, 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_uid)
);
CREATE TABLE outcomes (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	laterality VARCHAR(2) NOT NULL, 
	finding_index INTEGER NOT NULL, 
	truth VARCHAR(16) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	outcome_date VARCHAR(10) NOT NULL, 
	source VARCHAR(255) NOT NULL, 
	imported_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_uid, laterality, finding_index, kind, outcome_date)
);
CREATE TABLE result_kinds (
	id INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	error TEXT, 
	attempts INTEGER NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (result_id, kind), 
	FOREIGN KEY(result_id) REFERENCES results (id)
);
INSERT INTO "result_kinds" VALUES(1,1,'tid1500','built',NULL,1,'2026-11-30 10:00:00.000000');
CREATE TABLE result_objects (
	id INTEGER NOT NULL, 
	result_id INTEGER NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	sop_uid VARCHAR(64) NOT NULL, 
	relpath VARCHAR(255) NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(result_id) REFERENCES results (id)
);
CREATE TABLE results (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	analysis_key VARCHAR(64) NOT NULL, 
	current BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	roi_count INTEGER NOT NULL, 
	max_probability FLOAT, 
	analysis_ms FLOAT NOT NULL, 
	summary TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id), 
	UNIQUE (analysis_key)
);
INSERT INTO "results" VALUES(1,2,2,'a2',1,'2026-11-30 10:00:00.000000',0,NULL,0.0,'{}');
CREATE TABLE scored_breasts (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	accession_number VARCHAR(64), 
	laterality VARCHAR(2) NOT NULL, 
	model_name VARCHAR(64) NOT NULL, 
	model_version VARCHAR(64) NOT NULL, 
	role VARCHAR(16) NOT NULL, 
	job_id INTEGER NOT NULL, 
	score FLOAT NOT NULL, 
	findings INTEGER NOT NULL, 
	threshold FLOAT NOT NULL, 
	analysed_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_uid, laterality, model_name, model_version)
);
CREATE TABLE scored_findings (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	job_id INTEGER NOT NULL, 
	model_name VARCHAR(64) NOT NULL, 
	model_version VARCHAR(64) NOT NULL, 
	role VARCHAR(16) NOT NULL, 
	finding_index INTEGER NOT NULL, 
	sop_uid VARCHAR(64) NOT NULL, 
	laterality VARCHAR(2) NOT NULL, 
	"view" VARCHAR(16) NOT NULL, 
	centre_x FLOAT NOT NULL, 
	centre_y FLOAT NOT NULL, 
	radius_mm FLOAT NOT NULL, 
	pixel_spacing_mm FLOAT NOT NULL, 
	probability FLOAT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE series (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16) NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id), 
	UNIQUE (series_uid)
);
INSERT INTO "series" VALUES(1,1,'1.2.826.0.1.3680043.10.1919.1.1','MG');
CREATE TABLE shadow_runs (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	job_id INTEGER NOT NULL, 
	input_key VARCHAR(64) NOT NULL, 
	inputs TEXT NOT NULL, 
	model_name VARCHAR(64) NOT NULL, 
	model_version VARCHAR(64) NOT NULL, 
	active_name VARCHAR(64) NOT NULL, 
	active_version VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error TEXT, 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	roi_count INTEGER, 
	max_probability FLOAT, 
	analysis_ms FLOAT, 
	relpath VARCHAR(255), 
	PRIMARY KEY (id), 
	UNIQUE (job_id, input_key, model_name, model_version)
);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	generation INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	completed_at DATETIME, 
	accession_number VARCHAR(64), 
	PRIMARY KEY (id)
);
INSERT INTO "studies" VALUES(1,'1.2.826.0.1.3680043.10.1919.1','analysing',1,'2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000',NULL);
INSERT INTO "studies" VALUES(2,'1.2.826.0.1.3680043.10.1919.2','done',1,'2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000','2026-11-30 10:00:00.000000',NULL);
CREATE INDEX ix_studies_last_received_at ON studies (last_received_at);
CREATE UNIQUE INDEX ix_studies_study_uid ON studies (study_uid);
CREATE INDEX ix_studies_state ON studies (state);
CREATE INDEX ix_studies_accession_number ON studies (accession_number);
CREATE INDEX ix_other_objects_received_at ON other_objects (received_at);
CREATE INDEX ix_other_objects_study_uid ON other_objects (study_uid);
CREATE INDEX ix_model_events_at ON model_events (at);
CREATE INDEX ix_shadow_runs_job_id ON shadow_runs (job_id);
CREATE INDEX ix_shadow_runs_finished_at ON shadow_runs (finished_at);
CREATE INDEX ix_shadow_runs_state ON shadow_runs (state);
CREATE INDEX ix_shadow_runs_study_uid ON shadow_runs (study_uid);
CREATE INDEX ix_scored_breasts_study_uid ON scored_breasts (study_uid);
CREATE INDEX ix_scored_breasts_model_name ON scored_breasts (model_name);
CREATE INDEX ix_scored_breasts_accession_number ON scored_breasts (accession_number);
CREATE INDEX ix_scored_breasts_analysed_at ON scored_breasts (analysed_at);
CREATE INDEX ix_scored_findings_study_uid ON scored_findings (study_uid);
CREATE INDEX ix_outcomes_study_uid ON outcomes (study_uid);
CREATE INDEX ix_series_study_id ON series (study_id);
CREATE INDEX ix_jobs_study_id ON jobs (study_id);
CREATE UNIQUE INDEX ix_jobs_one_live_per_study ON jobs (study_id) WHERE state IN ('queued', 'running');
CREATE INDEX ix_jobs_input_key ON jobs (input_key);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE INDEX ix_instances_outcome ON instances (outcome);
CREATE INDEX ix_results_study_id ON results (study_id);
CREATE INDEX ix_result_objects_result_id ON result_objects (result_id);
CREATE INDEX ix_result_kinds_state ON result_kinds (state);
CREATE INDEX ix_result_kinds_result_id ON result_kinds (result_id);
CREATE INDEX ix_deliveries_result_id ON deliveries (result_id);
CREATE INDEX ix_deliveries_state ON deliveries (state);
CREATE INDEX ix_delivery_kinds_delivery_id ON delivery_kinds (delivery_id);
COMMIT;
