-- The example shop: customers, orders with a status and a total, order items. Idempotent, so
-- `scripts/dev up` can apply it on every start.
create table if not exists customers (
    id         bigserial primary key,
    email      text not null unique,
    name       text not null,
    created_at timestamptz not null default now()
);

create table if not exists orders (
    id          bigserial primary key,
    customer_id bigint not null references customers (id),
    status      text not null default 'new'
                check (status in ('new', 'paid', 'shipped', 'delivered', 'cancelled')),
    total       numeric(12, 2) not null default 0 check (total >= 0),
    created_at  timestamptz not null default now()
);

create table if not exists order_items (
    id         bigserial primary key,
    order_id   bigint not null references orders (id) on delete cascade,
    sku        text not null,
    quantity   integer not null check (quantity > 0),
    unit_price numeric(12, 2) not null check (unit_price >= 0)
);

create index if not exists orders_customer_id on orders (customer_id);
create index if not exists order_items_order_id on order_items (order_id);
